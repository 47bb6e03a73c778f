"""What the command-line entry points share: one-line errors, ranks and ``--help``."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from omegaconf import DictConfig

from ncsn.checkpoint import CheckpointError
from ncsn.registry import ConfigError

log = logging.getLogger("ncsn")


class JobFailed(RuntimeError):
    """A job of Hydra's submitit launcher failed; the message is the command's one line."""


# ``sampler=NAME`` overrides added by :func:`compose_checkpoint_sampler`, not the user's.
_CHECKPOINT_SAMPLER: set[str] = set()


def compose_checkpoint_sampler(argv: list[str]) -> list[str]:
    """``argv`` of ncsn-sample or ncsn-eval, with ``sampler=NAME`` of the checkpoint's own
    sampler added where ``sampler.KEY=VALUE`` changes one of its keys and no ``sampler=``
    picks another: the keys are then checked against that sampler's schema (pc's
    ``num_steps``), not the default annealed Langevin's. The checkpoint's saved settings
    stay (:func:`sampler_overrides` knows the added override is not the user's)."""
    import torch

    args = [a for a in argv if not a.startswith("-")]
    ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("ckpt=")), None)
    keys = [a for a in args if a.lstrip("+~").startswith("sampler.")]
    if ckpt is None or not keys or any(a.split("=", 1)[0] == "sampler" for a in args):
        return argv
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        name = saved["config"]["sampler"]["name"]
    except Exception:               # the checks that follow say what is wrong with the file
        return argv
    override = f"sampler={name}"
    _CHECKPOINT_SAMPLER.add(override)
    return [*argv, override]


def sampler_overrides(cfg: DictConfig, overrides: list[str]) -> tuple[dict, dict | None]:
    """From the command line's overrides: the sampler keys set one by one, and the whole
    sampler config (a plain dict) when ``sampler=NAME`` picked another one. The
    checkpoint's own sampler stays the default for everything else."""
    from omegaconf import OmegaConf

    keys, replaced = {}, None
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if override in _CHECKPOINT_SAMPLER:
            continue
        if key == "sampler":
            replaced = OmegaConf.to_container(cfg.sampler)
        elif key.startswith("sampler."):
            keys[key[len("sampler."):]] = OmegaConf.select(cfg, key)
    return keys, replaced


def run_cli(prog: str, job: Callable[[], object], expected: tuple = ()) -> object:
    """Run ``job``; known failures become one line on stderr and a non-zero exit status:
    2 for bad input (config, checkpoint, data), 1 for a diverged run, 128 + signal number
    for an interrupted one. In a job of Hydra's submitit launcher (``-m
    hydra/launcher=slurm``) a failure is raised as :class:`JobFailed` instead: the launcher
    reports an exception, while an exit would leave it waiting for a result that never
    comes (an interrupted job still exits: SLURM requeues it)."""
    from ncsn.distributed import RankFailed, shutdown
    from ncsn.training import NonFiniteLossError, TrainingInterrupted

    def fail(message: str, code: int):
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        if code == 2:
            _remove_empty_output_folder()
        if "SUBMITIT_FOLDER" in os.environ:               # set in every submitit job
            raise JobFailed(f"{prog}: error: {message}") from None
        sys.exit(code)

    try:
        return _run_then_leave(job, shutdown)
    except (ConfigError, CheckpointError, FileNotFoundError, *expected) as err:
        fail(str(err), 2)
    except NonFiniteLossError as err:
        fail(str(err), 1)
    except RankFailed as err:
        fail(str(err), err.exit_code)
    except TrainingInterrupted as err:
        print(f"{prog}: {err}; continue with trainer.resume=true "
              f"hydra.run.dir={err.path.parent.parent}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def _remove_empty_output_folder() -> None:
    """A command that stopped on bad input (a missing dataset, an empty class folder, no
    checkpoint to resume) before it wrote anything leaves no folder behind: Hydra's output
    folder is removed when it holds nothing but Hydra's own files and logs (rank 0 only)."""
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from ncsn import distributed

    if not HydraConfig.initialized() or not distributed.is_main():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    if not folder.is_dir():
        return
    files = [p.relative_to(folder) for p in folder.rglob("*") if not p.is_dir()]
    if all(f.parts[0] == ".hydra" or f.suffix == ".log" for f in files):
        logging.shutdown()                    # the log file's handler lets go of it
        shutil.rmtree(folder, ignore_errors=True)
        cwd = Path.cwd().resolve()
        for parent in folder.resolve().parents:       # outputs/DATE, outputs, when empty
            if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()


def _run_then_leave(job: Callable[[], object], shutdown: Callable[[], None]) -> object:
    """``job()``, then leave the process group whatever happened (see
    :func:`ncsn.distributed.shutdown`), before the error, if any, becomes a line and an exit."""
    try:
        return job()
    finally:
        shutdown()


def run_over_ranks(hydra_main: Callable[[], None]) -> None:
    """Call a Hydra entry point as one of the ranks of torchrun or a SLURM step, or alone.
    The ranks join before Hydra composes, so that they agree on one output folder (rank 0's
    clock), and only rank 0 writes Hydra's own files and log in it (as ``ncsn-train``)."""
    from ncsn import distributed
    from ncsn.launcher import QUIET_RANK

    if distributed.init_distributed() and not distributed.is_main():
        sys.argv += QUIET_RANK
    with distributed.rank_zero_clock():
        hydra_main()


def print_help(*args, **kwargs) -> None:
    """:func:`_print_help`; a reader that stops early (``--help | head``) ends it quietly."""
    try:
        _print_help(*args, **kwargs)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no error at exit


def _print_help(prog: str, config_name: str, summary: str, argv: list[str],
                groups: tuple[str, ...] | None = None, checkpoint_sampler: bool = False) -> None:
    """``--help``: the config groups with their options (the user-facing ones, not the
    schemas) and the config composed with the other arguments. ``checkpoint_sampler``: the
    command samples a checkpoint, whose own sampler replaces the sampler config composed
    here; the help says so, and shows that sampler when ``ckpt=PATH`` is given."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ncsn.config import config_dir

    root = Path(config_dir())
    print(f"{prog}: {summary}\n\n== Config groups (group=option) ==")
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        if groups is not None and group.name not in groups:
            continue
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        if options:
            print(f"{group.name}: {options}")
    if config_name == "train":
        print("hydra/launcher: slurm, submitit_local (sweeps: ncsn-train -m ...; "
              "pip install 'ncsn[slurm]')")
    overrides = [a for a in argv if a not in ("--help", "-h")]
    with initialize_config_dir(str(root), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    print("\n== Config (override any key with key=value) ==")
    if checkpoint_sampler:
        print(_checkpoint_sampler(cfg, overrides))
    print(OmegaConf.to_yaml(cfg))
    print("--cfg job prints the config of a run; --hydra-help shows Hydra's own options.")


def _checkpoint_sampler(cfg: DictConfig, overrides: list[str]) -> str:
    """With ``ckpt=PATH`` in ``cfg``: put the sampler that will run into ``cfg.sampler``
    (the checkpoint's saved one with the command line's sampler keys, or ``sampler=NAME``
    instead). Returns the comment line that says where the sampler shown comes from."""
    from omegaconf import OmegaConf, open_dict

    from ncsn.checkpoint import load_checkpoint
    from ncsn.generate import sampler_config

    ckpt = None if OmegaConf.is_missing(cfg, "ckpt") else cfg.get("ckpt")
    if ckpt is None:
        return ("# sampler: the checkpoint's own saved sampler replaces these defaults "
                "(sampler.KEY=VALUE given here changes one of its keys, sampler=NAME replaces "
                "it); add ckpt=PATH to --help to see the sampler that will run")
    try:
        keys, replaced = sampler_overrides(cfg, overrides)
        chosen = sampler_config(load_checkpoint(ckpt)["config"]["sampler"], keys, replaced)
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        return (f"# sampler: the checkpoint's own saved sampler replaces these defaults; "
                f"ckpt={ckpt} could not be read: {err}")
    with open_dict(cfg):
        cfg.sampler = chosen
    return (f"# sampler: the one that will run, ckpt={ckpt}'s saved sampler with the sampler "
            f"keys given here")
