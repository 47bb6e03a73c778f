"""Checkpoints: plain dicts of tensors, numbers and strings that load with
``torch.load(path, weights_only=True)``.

Keys: ``format`` ("ncsn"), ``version``, ``step``, ``config`` (the resolved config as a plain
dict), ``sigmas``, ``data_shape``, ``model``, ``ema`` (state dicts under the network's own keys;
``ema`` is None without EMA), ``optimizer``, ``rng``. Version 1 kept ``ema`` as torch's
AveragedModel state (``module.``-prefixed keys and a counter); version 2 files and later
keep the plain state dict. Both load. ``best.pt`` (trainer.keep_best) adds
``best_held_out_loss``.
Writes are atomic: a temporary file in the same folder, then a rename, so an interrupted
write never leaves a half-written ``last.pt``.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT, VERSION = "ncsn", 2
REQUIRED_KEYS = ("step", "config", "sigmas", "data_shape", "model")


class CheckpointError(Exception):
    """A checkpoint that is missing, truncated or not ncsn's. The message is one line."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_copy(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(state: dict, ckpt_dir: str | os.PathLike, keep_last: int = 3) -> Path:
    """Write ``step_NNNNNNNN.pt`` and ``last.pt``, keeping the newest ``keep_last`` step files."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / f"step_{state['step']:08d}.pt"
    atomic_save({"format": FORMAT, "version": VERSION, **state}, path)
    _atomic_copy(path, ckpt_dir / "last.pt")
    step_files = sorted(p for p in ckpt_dir.iterdir() if STEP_FILE.match(p.name))
    for old in step_files[:-keep_last] if keep_last > 0 else step_files[:-1]:
        old.unlink()
    return path


def save_best(state: dict, ckpt_dir: str | os.PathLike, held_out_loss: float) -> Path:
    """Write ``best.pt``: the run at its lowest held-out loss so far, which the file keeps
    as ``best_held_out_loss`` (trainer.keep_best)."""
    path = Path(ckpt_dir) / "best.pt"
    atomic_save({"format": FORMAT, "version": VERSION, **state,
                 "best_held_out_loss": float(held_out_loss)}, path)
    return path


def best_held_out_loss(ckpt_dir: str | os.PathLike) -> float | None:
    """The held-out loss ``best.pt`` in ``ckpt_dir`` was kept for; None without one."""
    path = Path(ckpt_dir) / "best.pt"
    if not path.is_file():
        return None
    return float(load_checkpoint(path)["best_held_out_loss"])


def existing_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` expanded, or a :class:`CheckpointError` where no such file is (the commands
    check this before they make their output folder)."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = " (it is a folder: pass RUN_DIR/checkpoints/last.pt)" if path.is_dir() else ""
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and check an ncsn checkpoint; every failure is a one-line :class:`CheckpointError`."""
    path = existing_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or "
                              f"not a torch file ({reason[:160]}); pick another file from its "
                              f"checkpoints/ folder") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ncsn checkpoint (no format='ncsn' tag); "
                              f"pass a file written by ncsn-train")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is an incomplete ncsn checkpoint: missing {missing}")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer ncsn (checkpoint version "
                              f"{ckpt['version']} > {VERSION}); upgrade ncsn")
    return ckpt
