"""One table for a whole Hydra multirun (``ncsn-train -m ...``): ``ncsn-eval sweep=DIR``.

A multirun folder holds one run folder per job (``DIR/0``, ``DIR/1``, ...), each with the
job's overrides in ``.hydra/overrides.yaml``. Each row gives a job's overrides, its final
step (``checkpoints/last.pt``), its last test loss (TensorBoard's ``test/loss``) and the
metrics that ``ncsn-eval`` wrote into the run (``eval/*/metrics.json``; the newest value of
each metric wins). What a job has not written yet shows as ``-``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ncsn.registry import ConfigError


@dataclass
class JobRow:
    """One job of a multirun: ``overrides`` as ``key=value`` strings, ``metrics`` by name."""

    job: str
    overrides: list[str]
    step: int | None = None
    test_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def sweep_jobs(multirun_dir: str | Path) -> list[Path]:
    """The job folders of ``multirun_dir`` (those holding ``.hydra/overrides.yaml``), in job
    number order."""
    root = Path(multirun_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"sweep={root} is not a folder; give the multirun folder that "
                          f"ncsn-train -m printed (multirun/DATE/TIME by default)")
    jobs = [p.parent.parent for p in root.glob("*/.hydra/overrides.yaml")]
    if not jobs:
        raise ConfigError(f"sweep={root} holds no job folders (*/.hydra/overrides.yaml); give "
                          f"the multirun folder itself, not one of its jobs")
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit()
                                       else 0, p.name))


def final_step(run_dir: Path) -> int | None:
    """The step of ``run_dir/checkpoints/last.pt``, memory-mapped (the weights stay on disk)."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])


def final_test_loss(run_dir: Path) -> float | None:
    """The test loss at the largest step logged to ``run_dir/tb`` (every event file of a
    resumed run is read)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run_dir / "tb").is_dir():
        return None
    logging.getLogger("tensorboard").setLevel(logging.WARNING)   # one line per event file
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    if "test/loss" not in events.Tags().get("scalars", []):
        return None
    return max(events.Scalars("test/loss"), key=lambda e: (e.step, e.wall_time)).value


def eval_metrics(run_dir: Path) -> dict[str, float]:
    """The metrics of every ``run_dir/eval/*/metrics.json``, oldest first so the newest value
    of a metric wins. A checkpoint sweep (``ncsn-eval run=``) gives its last checkpoint's."""
    found: dict[str, float] = {}
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        report = json.loads(path.read_text())
        if "checkpoints" in report:
            report = report["checkpoints"][-1] if report["checkpoints"] else {}
        found.update({k: v for k, v in report.get("metrics", {}).items()
                      if isinstance(v, (int, float)) and not k.endswith("_std")})
    return found


def job_row(run_dir: Path) -> JobRow:
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    return JobRow(run_dir.name, [str(o) for o in overrides], final_step(run_dir),
                  final_test_loss(run_dir), eval_metrics(run_dir))


def sweep_table(multirun_dir: str | Path) -> list[JobRow]:
    """A :class:`JobRow` for every job of ``multirun_dir``."""
    return [job_row(path) for path in sweep_jobs(multirun_dir)]


def shared_overrides(rows: list[JobRow]) -> list[str]:
    """The overrides every job was given (the rest is what the sweep varied)."""
    shared = [o for o in rows[0].overrides if all(o in r.overrides for r in rows[1:])]
    return shared if len(rows) > 1 else []


def format_sweep_table(rows: list[JobRow]) -> str:
    """The table as text: the overrides shared by all jobs on one line, then one line per job
    with the overrides that differ, the final step, the test loss and each metric."""
    shared = shared_overrides(rows)
    varied = [" ".join(o for o in r.overrides if o not in shared) or "-" for r in rows]
    metrics = list(dict.fromkeys(k for r in rows for k in r.metrics))
    width = max(len("overrides"), *map(len, varied))
    lines = [f"every job: {' '.join(shared)}"] if shared else []
    lines.append(f"{'job':<5}{'overrides':<{width}}{'step':>10}{'test_loss':>14}"
                 + "".join(f"{m:>14}" for m in metrics))
    for row, text in zip(rows, varied):
        lines.append(f"{row.job:<5}{text:<{width}}{_cell(row.step, 10)}"
                     f"{_cell(row.test_loss, 14)}"
                     + "".join(_cell(row.metrics.get(m), 14) for m in metrics))
    return "\n".join(lines)


def _cell(value, width: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}}" if isinstance(value, int) else f"{value:>{width}.6g}"


def write_sweep_table(rows: list[JobRow], out_dir: str | Path) -> Path:
    """``sweep_table.csv`` (job, run folder, overrides, step, test loss, metrics) and
    ``metrics.json`` (the rows) in ``out_dir``; returns the CSV's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(dict.fromkeys(k for r in rows for k in r.metrics))
    path = out_dir / "sweep_table.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "overrides", "step", "test_loss", *metrics])
        for r in rows:
            writer.writerow([r.job, " ".join(r.overrides), _csv(r.step), _csv(r.test_loss),
                             *(_csv(r.metrics.get(m)) for m in metrics)])
    (out_dir / "metrics.json").write_text(json.dumps(
        {"jobs": [vars(r) for r in rows]}, indent=2) + "\n")
    return path


def _csv(value) -> str:
    return "" if value is None else str(value)
