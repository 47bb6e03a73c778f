"""What ``ncsn-eval`` does, from a composed config: :func:`run`."""
from __future__ import annotations

import logging
from pathlib import Path

from ncsn import distributed
from ncsn.checkpoint import load_checkpoint
from ncsn.evaluate.files import SampleFiles
from ncsn.evaluate.multirun import format_sweep_table, sweep_table, write_sweep_table
from ncsn.evaluate.options import EvalOptions, as_dict, as_options, parse_metrics
from ncsn.evaluate.reference import (inception_reference, reference_from_batches,
                                     reference_from_dataset, save_reference, stats_cache_path)
from ncsn.evaluate.report import format_sweep, format_table, write_scores, write_sweep
from ncsn.evaluate.scoring import (Draw, Instruments, Scores, checkpoint_kind,
                                   score_checkpoint, score_stream, sweep_checkpoints,
                                   toy_reference)
from ncsn.registry import ConfigError

log = logging.getLogger(__name__)


def check_request(cfg) -> list[str]:
    """The inputs a ``mode=score`` request names (exactly one of ``ckpt``, ``samples``,
    ``run``, ``sweep``), or a :class:`ConfigError` saying what to pass; ``mode=stats`` names
    none. ``ncsn-eval`` checks this before Hydra makes the run's folder."""
    if cfg.mode == "stats":
        return []
    if cfg.mode != "score":
        raise ConfigError(f"mode must be score or stats, got {cfg.mode!r}")
    given = [k for k in ("ckpt", "samples", "run", "sweep") if cfg.get(k) is not None]
    if len(given) != 1:
        raise ConfigError("give one of ckpt=PATH, samples=DIR_OR_NPZ, run=RUN_DIR or "
                          f"sweep=MULTIRUN_DIR (got {', '.join(given) or 'none'}); or "
                          "ncsn-eval stats dataset=NAME")
    return given


def run(cfg, out_dir: str | Path, sampler_overrides: dict | None = None,
        sampler_replace: dict | None = None) -> dict:
    """Everything ``ncsn-eval`` does, from a composed :class:`ncsn.eval_config.EvalConfig`:
    ``mode=stats`` computes reference statistics; otherwise exactly one of ``ckpt``,
    ``samples`` or ``run`` is scored, or ``sweep`` (a multirun folder) is tabulated. Prints
    the results, writes them to ``out_dir`` and returns what metrics.json holds."""
    options = as_options(cfg.eval)
    if cfg.mode == "stats":
        if distributed.is_distributed():
            raise ConfigError(f"the stats sub-command runs in one process, not over "
                              f"{distributed.world_size()} ranks: start it without torchrun "
                              f"or srun")
        return run_stats(cfg, out_dir, options)
    given = check_request(cfg)
    if distributed.is_distributed() and cfg.get("ckpt") is None and cfg.get("run") is None:
        raise ConfigError(f"{given[0]}= is scored in "
                          f"one process, not over {distributed.world_size()} ranks: start "
                          f"it without torchrun or srun (ckpt= and run= split their "
                          f"sampling over ranks)")
    if cfg.get("sweep") is not None:
        return _multirun(cfg.sweep, Path(out_dir))
    draw = Draw(cfg.n_samples, cfg.batch_size, cfg.seed, dict(sampler_overrides or {}),
                sampler_replace, cfg.use_ema, cfg.device)
    out_dir = Path(out_dir)
    if cfg.samples is not None:
        return _report(_score_samples(cfg, options), out_dir)
    if cfg.ckpt is not None:
        path = Path(cfg.ckpt).expanduser()
        ckpt = load_checkpoint(path)
        tools, metrics = _prepare(cfg, options, ckpt)
        return _report(score_checkpoint(ckpt, metrics, draw, tools, path), out_dir)
    return _sweep(cfg, options, draw, out_dir)


def _multirun(multirun_dir: str, out_dir: Path) -> dict:
    """The table of a multirun's jobs (see :mod:`ncsn.evaluate.multirun`)."""
    rows = sweep_table(multirun_dir)
    print(format_sweep_table(rows), flush=True)
    path = write_sweep_table(rows, out_dir)
    print(f"wrote {path}", flush=True)
    return {"jobs": [vars(r) for r in rows]}


def _report(scores: Scores, out_dir: Path) -> dict:
    if not distributed.is_main():
        return scores.to_json()
    print(format_table(scores), flush=True)
    write_scores(scores, out_dir)
    print(f"wrote {out_dir / 'metrics.json'}", flush=True)
    return scores.to_json()


def _sweep(cfg, options: EvalOptions, draw: Draw, out_dir: Path) -> dict:
    """Score every checkpoint of ``cfg.run`` with the same instruments and seed; the first
    metric names the best."""
    paths = sweep_checkpoints(cfg.run)
    tools, metrics = _prepare(cfg, options, load_checkpoint(paths[0]))
    results = []
    for path in paths:
        log.info("scoring %s", path)
        results.append(score_checkpoint(load_checkpoint(path), metrics, draw, tools, path))
    if not distributed.is_main():
        return {}
    summary = write_sweep(results, metrics, out_dir)
    print(format_sweep(results, summary), flush=True)
    print(f"wrote {out_dir / 'sweep.csv'}, {out_dir / 'sweep.png'}", flush=True)
    return summary


def _prepare(cfg, options: EvalOptions, ckpt: dict) -> tuple[Instruments, list[str]]:
    """Metrics and instruments for a checkpoint (the first one of a sweep)."""
    kind, name = checkpoint_kind(ckpt)
    metrics = parse_metrics(cfg.metric, kind, name, has_net=True)
    tools = Instruments.build(metrics, options, cfg.device)
    if {"fid", "kid"} & set(metrics):
        dataset_cfg = cfg.dataset if cfg.dataset is not None else ckpt["config"]["dataset"]
        # Rank 0 alone scores, so it alone needs (and may compute and cache) the reference;
        # the others wait for it here, and stop with its message if it fails.
        with distributed.all_or_none():
            if distributed.is_main():
                tools.reference = inception_reference(tools.inception, options, metrics,
                                                      cfg.ref_stats, dataset_cfg, cfg.split,
                                                      cfg.max_images, cfg.batch_size)
    return tools, metrics


def _score_samples(cfg, options: EvalOptions) -> Scores:
    files = SampleFiles(cfg.samples)
    name = as_dict(cfg.dataset)["name"] if cfg.dataset is not None else None
    metrics = parse_metrics(cfg.metric, files.kind, name)
    tools = Instruments.build(metrics, options, cfg.device)
    if {"fid", "kid"} & set(metrics):
        tools.reference = inception_reference(tools.inception, options, metrics,
                                              cfg.ref_stats, cfg.dataset,
                                              cfg.split, cfg.max_images, cfg.batch_size)
    points = None
    if files.kind == "points" and cfg.dataset is not None:
        points = toy_reference(cfg.dataset, cfg.seed)
    scores = score_stream(files.batches(cfg.batch_size), len(files), metrics, tools, points,
                          cfg.seed)
    scores.source = {"samples": str(files.path)}
    return scores


def run_stats(cfg, out_dir: str | Path, options: EvalOptions) -> dict:
    """``ncsn-eval stats``: Inception statistics of ``dataset``'s ``split`` (cached, or at
    ``ref_stats``), or of the images at ``samples`` (to ``ref_stats``, default
    out_dir/stats.npz)."""
    if (cfg.dataset is None) == (cfg.get("samples") is None):
        raise ConfigError("the stats sub-command takes one source: dataset=NAME (e.g. "
                          "ncsn-eval stats dataset=cifar10) or samples=DIR_OR_NPZ")
    tools = Instruments.build(["fid", "kid"], options, cfg.device)
    if cfg.dataset is not None:
        path = Path(cfg.ref_stats).expanduser() if cfg.ref_stats else \
            stats_cache_path(cfg.dataset, cfg.split, options, cfg.max_images)
        ref = reference_from_dataset(cfg.dataset, tools.inception, options, cfg.split,
                                     cfg.max_images, cfg.batch_size)
    else:
        files = SampleFiles(cfg.samples)
        if files.kind != "images":
            raise ConfigError(f"{files.path} holds points; reference statistics are of images")
        path = Path(cfg.ref_stats).expanduser() if cfg.ref_stats else Path(out_dir) / "stats.npz"
        ref = reference_from_batches(files.batches(cfg.batch_size), tools.inception, options,
                                     str(files.path), len(files))
    save_reference(path, ref)
    print(f"reference statistics of {ref.describe()}: mu {ref.mu.shape}, sigma "
          f"{ref.sigma.shape}, {len(ref.features)} features kept for KID", flush=True)
    if options.inception_random_init:
        print("note: computed with a RANDOMLY INITIALISED Inception network (a test setting): "
              "meaningless for real FIDs", flush=True)
    print(f"wrote {path}", flush=True)
    return {"stats": str(path), "n": ref.n, "source": ref.source}
