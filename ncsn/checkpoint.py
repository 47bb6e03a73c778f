"""Checkpoints: plain dicts of tensors, numbers and strings that load with
``torch.load(path, weights_only=True)``.

Keys: ``format`` ("ncsn"), ``version``, ``step``, ``config`` (the resolved config as a plain
dict), ``sigmas``, ``data_shape``, ``model``, ``ema`` (state dicts under the network's own keys;
``ema`` is None without EMA), ``optimizer``, ``rng``. Version 1 kept ``ema`` as torch's
AveragedModel state (``module.``-prefixed keys and a counter); version 2 files and later
keep the plain state dict. Both load. ``best.pt`` (trainer.keep_best) adds
``best_held_out_loss``.
Writes are atomic: a temporary file in the same folder, then a rename, so an interrupted
write never leaves a half-written ``last.pt``. ``last.pt`` is a hard link to the newest
``step_*.pt`` (a copy where links fail), so a run's checkpoints take ``keep_last`` files' space.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

FORMAT, VERSION = "ncsn", 2
REQUIRED_KEYS = ("step", "config", "sigmas", "data_shape", "model")


class CheckpointError(Exception):
    """A checkpoint that is missing, truncated or not ncsn's. The message is one line."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file that torch cannot read (truncated, corrupt, not a torch file):
    ``path`` and ``reason``, torch's own first line."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot read checkpoint {path}: the file is truncated, corrupt or not "
                         f"a torch file ({reason}); pick another file from its checkpoints/ "
                         f"folder")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path``, then rename over it. The file gets the
    mode the umask gives new files (0644 under umask 022), like the run's other files, not
    the temporary file's 0600: teammates on a shared cluster read checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_name(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp"


def _atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link to ``src`` (link a temporary name, then rename it over
    ``dst``), so ``last.pt`` takes no space of its own; a copy where the file system
    has no hard links."""
    tmp = _temporary_name(dst)
    try:
        os.link(src, tmp)
    except OSError:
        _atomic_copy(src, dst)
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = _temporary_name(dst)
    try:
        shutil.copy(src, tmp)                               # with src's mode
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(state: dict, ckpt_dir: str | os.PathLike, keep_last: int = 3) -> Path:
    """Write ``step_NNNNNNNN.pt`` and ``last.pt`` (a hard link to it), keeping the newest
    ``keep_last`` step files. A full disk is a one-line :class:`CheckpointError`."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / f"step_{state['step']:08d}.pt"
    with _disk_full_is_one_line(path, state):
        atomic_save({"format": FORMAT, "version": VERSION, **state}, path)
        _atomic_link(path, ckpt_dir / "last.pt")
    step_files = sorted(p for p in ckpt_dir.iterdir() if STEP_FILE.match(p.name))
    for old in step_files[:-keep_last] if keep_last > 0 else step_files[:-1]:
        old.unlink()
    return path


@contextmanager
def _disk_full_is_one_line(path: Path, state: dict):
    """Turn a full disk (or quota) while writing ``path`` into a :class:`CheckpointError`
    naming the file, the space it needed and the last good checkpoint (atomic writes have
    already removed the partial file)."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(
            f"disk full writing checkpoint {path}: it needs about {_size(_nbytes(state))}, "
            f"{_size(free)} free; the last good checkpoint is "
            f"{_last_good(path.parent)}; free some space and resume with trainer.resume=true"
        ) from None


def _nbytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists, tuples): about its file's size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _size(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def _last_good(ckpt_dir: Path) -> str:
    """The checkpoint ``last.pt`` in ``ckpt_dir`` holds, named by its step file when it is one."""
    last = ckpt_dir / "last.pt"
    if not last.is_file():
        return f"none (no {last} yet)"
    for step_file in sorted(ckpt_dir.glob("step_*.pt"), reverse=True):
        if step_file.exists() and os.path.samefile(step_file, last):
            return f"{last} ({step_file.name})"
    return str(last)


def save_best(state: dict, ckpt_dir: str | os.PathLike, held_out_loss: float) -> Path:
    """Write ``best.pt``: the run at its lowest held-out loss so far, which the file keeps
    as ``best_held_out_loss`` (trainer.keep_best)."""
    path = Path(ckpt_dir) / "best.pt"
    with _disk_full_is_one_line(path, state):
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
        # The inner error's first line, whole (torch's later lines are advice for pickles).
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnreadableCheckpointError(path, reason) from None
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
