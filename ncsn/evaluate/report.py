"""Reports: the text table, metrics.json, TensorBoard scalars, and a sweep's CSV and plot."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

from ncsn.evaluate.options import METRICS
from ncsn.evaluate.scoring import Scores, best_of

NLL_KEYS = ("nll", "bpd", "nll_nfe")        # metric=nll: counted over the test samples


def format_table(scores: Scores) -> str:
    """The scores as a text table: metric, value, std, sample count, reference."""
    lines = [f"{'metric':<18}{'value':>14}{'std':>12}{'n_samples':>11}  reference"]
    reference = scores.details.get("reference", "")
    for key, value in scores.values.items():
        if key.endswith("_std"):
            continue
        std = scores.values.get(f"{key}_std")
        std_text = f"{std:.6g}" if std is not None else ""
        n = scores.details.get("score_error_points", 0) if key == "score_error" \
            else scores.details.get("nll_points", 0) if key in NLL_KEYS else scores.n_samples
        ref = {"is": "", "digits_confidence": "", "score_error": "",
               "digits_fid": "the 360 held-out digits", "nll": "the test split",
               "bpd": "the test split", "nll_nfe": ""}.get(key, reference)
        lines.append(f"{key:<18}{value:>14.6g}{std_text:>12}{n:>11}  {ref}")
    if "digits_histogram" in scores.details:
        counts = "  ".join(f"{d}:{c}" for d, c in enumerate(scores.details["digits_histogram"]))
        lines.append(f"digits class histogram  {counts}")
    if "score_error" in scores.details:
        lines.append(score_error_table(scores.details["score_error"]))
    if scores.details.get("inception"):
        lines.append(f"Inception weights: {scores.details['inception']}")
    lines += [f"note: {note}" for note in scores.notes]
    return "\n".join(lines)


def score_error_table(table: dict) -> str:
    """Per-noise-level score errors as text."""
    lines = ["score error per noise level (relative = E|s - grad log q_sigma|^2 / "
             "E|grad log q_sigma|^2)", f"{'i':>4}{'sigma':>12}{'mse':>14}{'relative':>12}"]
    for i, (s, mse, rel) in enumerate(zip(table["sigma"], table["mse"], table["relative"])):
        lines.append(f"{i:>4}{s:>12.4g}{mse:>14.6g}{rel:>12.4g}")
    return "\n".join(lines)


def write_scores(scores: Scores, out_dir: str | Path) -> Path:
    """``metrics.json`` in ``out_dir`` and the scalars to TensorBoard (``out_dir/tb``, tags
    ``eval/<metric>`` at the checkpoint's step)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(scores.to_json(), indent=2) + "\n")
    _tensorboard([scores], out_dir)
    return path


def _tensorboard(results: Sequence[Scores], out_dir: Path) -> None:
    """Scalars ``eval/<metric>`` at each checkpoint's step (0 for samples on disk) in
    ``out_dir/tb``; beside a run's own ``tb/`` when out_dir is RUN_DIR/eval/..., so that
    ``tensorboard --logdir RUN_DIR`` shows both."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tb"))
    try:
        for scores in results:
            for key, value in scores.values.items():
                if math.isfinite(value):
                    writer.add_scalar(f"eval/{key}", value, scores.step)
            writer.add_scalar("eval/n_samples", scores.n_samples, scores.step)
            table = scores.details.get("score_error")
            for i, rel in enumerate(table["relative"] if table else []):
                writer.add_scalar(f"score_error_relative/sigma_{i:02d}", rel, scores.step)
            if scores.notes:
                writer.add_text("eval/notes", "\n\n".join(scores.notes), scores.step)
    finally:
        writer.close()


def write_sweep(results: Sequence[Scores], metrics: Sequence[str], out_dir: str | Path) -> dict:
    """``sweep.csv`` (step, checkpoint, n_samples, every scalar), ``sweep.png`` (each metric
    against step, the best marked), ``metrics.json`` and TensorBoard scalars; returns the
    summary with the best checkpoint by the first metric."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in results for k in r.values))
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["step", "checkpoint", "n_samples", *keys])
        for r in results:
            rows.writerow([r.step, r.source.get("ckpt"), r.n_samples,
                           *(f"{r.values.get(k, float('nan')):.8g}" for k in keys)])
    best = best_of(results, metrics[0])
    key = METRICS[metrics[0]].key
    summary = {"best": {"metric": key, "value": best.values[key], "step": best.step,
                        "ckpt": best.source.get("ckpt")},
               "checkpoints": [r.to_json() for r in results]}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    _sweep_plot(results, metrics, best, out_dir / "sweep.png")
    _tensorboard(results, out_dir)
    return summary


def _sweep_plot(results: Sequence[Scores], metrics: Sequence[str], best: Scores,
                path: Path) -> None:
    from ncsn import viz

    plt = viz.plt
    keys = [METRICS[m].key for m in metrics]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    steps = [r.step for r in results]
    for ax, key in zip(axes[0], keys):
        values = [r.values[key] for r in results]
        stds = [r.values.get(f"{key}_std", 0.0) for r in results]
        ax.errorbar(steps, values, yerr=stds, marker="o", capsize=3)
        ax.plot([best.step], [best.values[key]], "r*", markersize=14,
                label=f"best by {METRICS[metrics[0]].key}")
        n = results[0].details.get("score_error_points") if key == "score_error" else \
            results[0].n_samples
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} (n = {n})")
    axes[0][0].legend()
    fig.tight_layout()
    viz.save_figure(fig, path)


def format_sweep(results: Sequence[Scores], summary: dict) -> str:
    keys = list(dict.fromkeys(k for r in results for k in r.values))
    lines = [f"{'step':>10}{'n_samples':>11}" + "".join(f"{k:>16}" for k in keys)]
    for r in results:
        lines.append(f"{r.step:>10}{r.n_samples:>11}"
                     + "".join(f"{r.values.get(k, float('nan')):>16.6g}" for k in keys))
    best = summary["best"]
    lines.append(f"best checkpoint by {best['metric']}: {best['ckpt']} (step {best['step']}, "
                 f"{best['metric']} {best['value']:.6g})")
    notes = list(dict.fromkeys(n for r in results for n in r.notes))
    return "\n".join(lines + [f"note: {n}" for n in notes])
