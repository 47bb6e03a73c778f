"""The typed schema of ``ncsn-eval`` (configs/eval.yaml), registered in Hydra's ConfigStore
as ``eval_schema``; the metric options (``eval.*``) are :class:`ncsn.evaluate.EvalOptions`.

The default output folder sits next to what is scored: ``RUN_DIR/eval/DATE_TIME`` for
``ckpt=RUN_DIR/checkpoints/X.pt`` and ``run=RUN_DIR``, ``MULTIRUN_DIR/eval/DATE_TIME`` for
``sweep=MULTIRUN_DIR``, ``eval/DATE_TIME`` in the working
directory for ``samples=`` and the stats sub-command (the ``ncsn_eval_dir`` resolver).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ncsn.evaluate import FID_SAMPLES, EvalOptions


@dataclass
class EvalConfig:
    mode: str = "score"              # score | stats (`ncsn-eval stats ...` means mode=stats)
    ckpt: Optional[str] = None       # score a checkpoint: draw n_samples with its sampler
    samples: Optional[str] = None    # score samples on disk: .npz, folder of .npz shards or PNGs
    run: Optional[str] = None        # score every RUN_DIR/checkpoints/step_*.pt (a sweep)
    sweep: Optional[str] = None      # tabulate a multirun (ncsn-train -m): every job's
                                     # overrides, final step, test loss and metrics
    metric: Any = "auto"             # fid | is | kid | digits | swd | energy | score_error, a
                                     # list [fid,is,kid], or auto (fid; digits; swd + energy)
    n_samples: int = FID_SAMPLES     # samples drawn from each checkpoint
    batch_size: int = 100            # samples drawn, files read and reference images per batch
    seed: int = 0
    use_ema: bool = True
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    dataset: Any = None              # reference data (dataset=NAME); null: the checkpoint's
    split: str = "train"             # train | test: the split of the reference statistics
    max_images: Optional[int] = None # reference images used (a seeded subset); null: all
    ref_stats: Optional[str] = None  # statistics .npz (ours or published mu/sigma); stats
                                     # sub-command: where to write them
    eval: EvalOptions = field(default_factory=EvalOptions)
    sampler: Any = None              # sampler.KEY=VALUE overrides the checkpoint's sampler


def eval_dir(ckpt: Optional[str], run: Optional[str], stamp: str,
             sweep: Optional[str] = None) -> str:
    """The default output folder (see the module docstring)."""
    if sweep is not None and Path(sweep).is_dir():   # a missing folder is refused, not made
        return str(Path(sweep) / "eval" / stamp)
    if run is not None:
        return str(Path(run) / "eval" / stamp)
    if ckpt is not None:
        folder = Path(ckpt).parent
        run_dir = folder.parent if folder.name == "checkpoints" else folder
        return str(run_dir / "eval" / stamp)
    return str(Path("eval") / stamp)


def register_eval_configs() -> None:
    """Store the schema (``eval_schema``) and the output-folder resolver."""
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    OmegaConf.register_new_resolver("ncsn_eval_dir", eval_dir, replace=True)
