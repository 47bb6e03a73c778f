"""The run as a checkpoint, and which checkpoint a run resumes from."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from ncsn import distributed, registry
from ncsn.checkpoint import (STEP_FILE, CheckpointError, UnreadableCheckpointError,
                             existing_checkpoint, load_checkpoint, save_checkpoint)
from ncsn.training.ema import plain_ema_state
from ncsn.training.monitor import check_finite
from ncsn.training.run import to_plain

if TYPE_CHECKING:
    from ncsn.training.run import Run


log = logging.getLogger(__name__)


def state_dict(run: Run) -> dict:
    """The run as a checkpoint: tensors, numbers, strings and the config as a plain dict."""
    rng = {"torch": torch.get_rng_state(), "data": run.data_generator.get_state()}
    if run.device.type == "cuda":
        # The training GPU's generator (each rank's own, equal on all ranks).
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {"step": run.step, "config": to_plain(run.cfg), "sigmas": run.sigmas.cpu(),
            "data_shape": list(run.data.shape), "model": run.module.state_dict(),
            "ema": run.ema.module.state_dict() if run.ema is not None else None,
            "optimizer": run.optimizer.state_dict(), "rng": rng,
            "scaler": run.speed.scaler.state_dict() if run.speed.scaler.is_enabled() else None}


def load_state(run: Run, ckpt: dict) -> None:
    run.module.load_state_dict(ckpt["model"])
    if run.ema is not None and ckpt.get("ema") is not None:
        run.ema.module.load_state_dict(plain_ema_state(ckpt["ema"]))
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and run.speed.scaler.is_enabled():
        run.speed.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    run.data_generator.set_state(ckpt["rng"]["data"])
    cuda_rng = ckpt["rng"].get("cuda")
    if cuda_rng is not None and run.device.type == "cuda":
        # Older checkpoints kept every visible GPU's state; the first was the training GPU's.
        torch.cuda.set_rng_state(cuda_rng[0] if isinstance(cuda_rng, list) else cuda_rng,
                                 run.device)
    run.step = ckpt["step"]


def save(run: Run) -> Path:
    """Write the step's checkpoint and ``last.pt`` (rank 0 only; every rank checks the loss
    first, so all of them stop alike on a non-finite one). Returns the file written."""
    check_finite(run)
    ckpt_dir = run.run_dir / "checkpoints"
    if not distributed.is_main():
        return ckpt_dir / "last.pt"
    path = save_checkpoint(state_dict(run), ckpt_dir, run.cfg.trainer.keep_last)
    log.info("step %d: checkpoint %s", run.step, path)
    return path


def resume_mode(value) -> str:
    """trainer.resume as "auto" (resume from the run directory's newest readable checkpoint
    if it holds one, else start fresh), "true" (the same, failing without one), "false"
    (start fresh) or "path" (any other value: the checkpoint file to resume from)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value in ("auto", "true", "false"):
        return value
    if not isinstance(value, str) or not value:
        raise registry.ConfigError(f"trainer.resume must be auto, true, false or a checkpoint "
                                   f"file, got {value!r}")
    return "path"


def resume(cfg: DictConfig, run_dir: Path) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume from and its file; (None, None): start fresh.

    Rank 0 picks the file (:func:`readable_checkpoint`); every rank then loads it, and
    every rank fails alike when it cannot be resumed."""
    chosen = ckpt = None
    with distributed.all_or_none():
        if distributed.is_main():
            chosen, ckpt = readable_checkpoint(cfg, run_dir / "checkpoints")
    chosen = distributed.broadcast_object(chosen)
    with distributed.all_or_none():
        if chosen is not None:
            ckpt = ckpt if ckpt is not None else load_checkpoint(chosen)
            check_same_parts(cfg, ckpt, chosen)
    return ckpt, chosen


def readable_checkpoint(cfg: DictConfig, ckpt_dir: Path) -> tuple[Path | None, dict | None]:
    """trainer.resume=PATH: that file. auto and true: ``last.pt``, or when it cannot be read
    (a crash or a full disk while it was written), the newest ``step_*.pt`` that can, with
    a warning. Returns the file and its contents; (None, None) to start fresh."""
    value = cfg.trainer.resume
    mode = resume_mode(value)
    if mode == "false":
        return None, None
    if mode == "path":
        try:
            path = existing_checkpoint(value)
        except CheckpointError as err:
            raise CheckpointError(f"trainer.resume={value}: {err} (trainer.resume takes auto, "
                                  f"true, false or a checkpoint file)") from None
        return path, load_checkpoint(path)
    last = ckpt_dir / "last.pt"
    step_files = sorted((p for p in ckpt_dir.glob("step_*.pt") if STEP_FILE.match(p.name)),
                        reverse=True)
    candidates = [p for p in (last, *step_files) if p.is_file()]
    if not candidates:
        if mode == "true":
            raise CheckpointError(f"trainer.resume=true but there is no {last}; pass "
                                  f"hydra.run.dir=<the run to resume> or trainer.resume=PATH")
        return None, None
    failures = []
    for path in candidates:
        if failures and os.path.samefile(path, candidates[0]):
            failures[0] += f" (the same file as {path.name})"   # last.pt is its hard link
            continue
        try:
            ckpt = load_checkpoint(path)
        except UnreadableCheckpointError as err:
            failures.append(f"{err.path} cannot be read ({err.reason})")
            continue
        except CheckpointError as err:
            failures.append(str(err))
            continue
        if failures:
            log.warning("%s; resuming from %s, the newest checkpoint that reads",
                        "; ".join(failures), path)
        return path, ckpt
    raise CheckpointError(f"no checkpoint in {ckpt_dir} can be read ({'; '.join(failures)}); "
                          f"resume from another run's file with trainer.resume=PATH, or start "
                          f"over with trainer.resume=false")


def check_same_parts(cfg: DictConfig, ckpt: dict, path: Path) -> None:
    """A run resumes only with the dataset, model, noise and loss it was trained with."""
    for group in ("dataset", "model", "noise", "loss"):
        if ckpt["config"].get(group) != to_plain(cfg[group]):
            raise registry.ConfigError(
                f"cannot resume {path}: its {group} config {ckpt['config'].get(group)} differs "
                f"from this run's {to_plain(cfg[group])}; resume with the same {group} settings")


def why_fresh(cfg: DictConfig, run_dir: Path) -> str:
    """Why a run starts at step 0 (its log says so)."""
    if resume_mode(cfg.trainer.resume) == "false":
        return "trainer.resume=false"
    return f"no checkpoint {run_dir / 'checkpoints' / 'last.pt'} to resume (trainer.resume=auto)"
