import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ncsn.config import config_dir, register_configs

register_configs()
# Tiny networks run faster on one thread than on two that contend.
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A few hundred steps of a small model: quick on a CPU, enough to learn something.
TINY = ["trainer.n_steps=40", "trainer.ckpt_every=20", "trainer.batch_size=64",
        "trainer.log_every=10", "trainer.n_plot_samples=0", "dataset.n_samples=512",
        "dataset.n_test=128", "model.hidden=32", "model.n_layers=2",
        "sampler.n_steps_each=5", "trainer.device=cpu"]


def compose_train(overrides=()):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_cli(command, *args, cwd=None, timeout=240, **popen):
    """Run a console script of this environment; returns the CompletedProcess."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / command), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=env, **popen)


def spawn_ranks(worker, args: tuple, timeout: float, nprocs: int = 2) -> None:
    """Start ``nprocs`` processes of ``worker(rank, *args)`` (spawned, as torchrun's ranks are
    separate processes) and wait for all of them, failing the test if they take longer
    than ``timeout`` seconds (a hang) or one of them dies."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {timeout} s (a hang)")


@pytest.fixture
def float64():
    """float64 as the default dtype for the test, and a fixed seed."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def perturbed(module, scale=0.3):
    """``module`` in float64 with every parameter moved off its (often zero) initial value,
    so couplings and scalings are not the identity."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def documented_setup(header: list[str]) -> list[tuple[str, object]]:
    """``(key, value)`` of the docs/REPRODUCING.md table whose header row is ``header``
    (its rows that name an ncsn key)."""
    import yaml

    rows, inside = [], False
    for line in (REPO / "docs" / "REPRODUCING.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells == header:
            inside = True
        elif inside and not set(cells[0]) <= {"-"} and cells[0] != "—":
            rows.append((cells[0].strip("`"), yaml.safe_load(cells[1].strip("`"))))
    return rows


def check_documented_setup(cfg, header: list[str], min_rows: int) -> None:
    """Every row of the docs/REPRODUCING.md table headed ``header`` that names an ncsn key
    holds the value ``cfg`` composes to (and there are more than ``min_rows``)."""
    from omegaconf import OmegaConf

    rows = documented_setup(header)
    assert len(rows) > min_rows
    for key, documented in rows:
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == documented, f"{key} is {got!r}, docs/REPRODUCING.md says {documented!r}"


@pytest.fixture
def tiny():
    return list(TINY)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (-n 2 --dist loadgroup), the tests that submit SLURM jobs run one
    after another in one worker: the local cluster has 2 CPUs, and two tests' jobs at once
    would wait on each other."""
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group("slurm"))
