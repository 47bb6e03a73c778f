"""Checkpoint files on disk: their mode, last.pt as a hard link, and a full disk."""
import errno
import os
import subprocess
import sys

import pytest
import torch

import ncsn.checkpoint as checkpoint
from conftest import TINY
from ncsn.checkpoint import CheckpointError, load_checkpoint, save_best, save_checkpoint


def state(step: int) -> dict:
    """The smallest state load_checkpoint accepts, with a weight worth some bytes."""
    return {"step": step, "config": {}, "sigmas": torch.ones(3), "data_shape": (2,),
            "model": {"w": torch.full((1000,), float(step))}}


@pytest.fixture
def umask():
    """Set the process's umask for one test, then put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_get_the_mode_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    save_checkpoint(state(1), tmp_path)
    save_best(state(1), tmp_path, held_out_loss=1.0)
    for name in ("step_00000001.pt", "last.pt", "best.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_last_is_a_hard_link_to_the_newest_step_file_and_rotation_keeps_keep_last(tmp_path):
    for step in range(1, 6):
        save_checkpoint(state(step), tmp_path, keep_last=3)
    steps = sorted(p.name for p in tmp_path.glob("step_*.pt"))
    assert steps == ["step_00000003.pt", "step_00000004.pt", "step_00000005.pt"]
    assert (tmp_path / "last.pt").samefile(tmp_path / "step_00000005.pt")
    inodes = {p.stat().st_ino for p in tmp_path.iterdir()}
    assert len(inodes) == 3                                       # keep_last files, not 4
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 5
    assert not list(tmp_path.glob(".*.tmp"))


def test_last_is_a_copy_where_links_fail(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(checkpoint.os, "link", no_links)
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    assert not (tmp_path / "last.pt").samefile(tmp_path / "step_00000002.pt")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_is_one_line_naming_the_file_and_the_last_good_checkpoint(tmp_path,
                                                                              monkeypatch):
    save_checkpoint(state(1), tmp_path)
    real_save = torch.save

    def fill_the_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 100)                                        # a partial file
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(state(2), tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    message = str(err.value)
    assert "\n" not in message
    assert "step_00000002.pt" in message and "MB" in message
    assert "the last good checkpoint is" in message and "step_00000001.pt" in message
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "step_00000002.pt").exists()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1


FULL_AFTER_ONE_CHECKPOINT = """
import errno, sys, torch
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) > 1:                 # the first checkpoint fits, the second fills the disk
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from ncsn.cli.train import main
sys.argv = ["ncsn-train", *sys.argv[1:]]
main()
"""


def test_ncsn_train_exits_2_with_one_line_on_a_full_disk(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", FULL_AFTER_ONE_CHECKPOINT, *TINY,
                             f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                            timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "disk full writing checkpoint" in error[0], result.stderr
    assert "step_00000040.pt" in error[0] and "step_00000020.pt" in error[0]
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob(".*.tmp"))
    assert load_checkpoint(ckpts / "last.pt")["step"] == 20
