"""Checks that run before Hydra starts a job: the command line is composed here first, so
that a misspelled key, a wrong value or parts that do not fit together end the command
with one line and exit status 2, before Hydra creates the run's folder (``outputs/DATE/TIME``,
``eval/DATE_TIME``) and before anything is built."""
from __future__ import annotations

import difflib
import itertools
import math
import re
import sys
from typing import Callable

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ncsn.checkpoint import CheckpointError
from ncsn.registry import ConfigError

# Trainer keys that count something and must be at least 1: n_steps=-5 trained nothing and
# exited 0, a batch of 0 failed after the model was built, ckpt_every=0 divides by zero.
# (log_every below 1 is read as 1.)
AT_LEAST_ONE = ("n_steps", "batch_size", "accumulate", "ckpt_every")


def precheck(prog: str, config_name: str, check: Callable[[DictConfig], None]) -> None:
    """Compose ``config_name`` with the command line's overrides and run ``check`` on it;
    any problem becomes ``prog: error: <one line>`` on stderr and exit status 2.

    A sweep (``-m``) is checked job by job (:func:`sweep_points`) before Hydra makes its
    ``multirun/`` folder; a command line with another flag (``--cfg job``, ``--info``, ...)
    is left to Hydra: printing a config needs no valid values."""
    argv = sys.argv[1:]
    sweep = [arg for arg in argv if arg in SWEEP_FLAGS]
    if any(arg.startswith("-") and arg not in SWEEP_FLAGS for arg in argv):
        return
    overrides = [arg for arg in argv if arg not in SWEEP_FLAGS]
    try:
        points = sweep_points(overrides) if sweep else [overrides]
        for k, point in enumerate(points):
            try:
                cfg = compose_checked(config_name, point)
                check_keys(cfg)
                check(cfg)
            except (ConfigError, CheckpointError) as err:
                if len(points) == 1:
                    raise
                raise ConfigError(f"sweep job {k + 1} of {len(points)} ({' '.join(point)}): "
                                  f"{err}") from None
    except (ConfigError, CheckpointError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


SWEEP_FLAGS = ("-m", "--multirun")
# A sweep of more jobs than this is checked along each swept key alone (the others at their
# first value), not job by job: a key's values are what a typo hides in.
MAX_CHECKED_JOBS = 64


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The jobs of ``-m`` with these overrides: Hydra's sweep syntax (``a=1,2``,
    ``range(...)``, ``choice(...)``) expanded into its cartesian product, or, past
    MAX_CHECKED_JOBS jobs, each swept value with the other keys at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(_first_lines(err)) from None
    values = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            values.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            values.append([text])
    if math.prod(len(v) for v in values) <= MAX_CHECKED_JOBS:
        return [list(point) for point in itertools.product(*values)]
    first = [v[0] for v in values]
    return [first[:i] + [value] + first[i + 1:]
            for i, options in enumerate(values) for value in options]


def compose_checked(config_name: str, overrides: list[str]) -> DictConfig:
    """The config that ``overrides`` give, or a :class:`ConfigError` naming every override
    that does not compose: each bad one is left out in turn and the rest composed again, so
    that all of them are named at once."""
    # Only train.yaml has the optional experiment group.
    problems = _missing_optional_choices(overrides) if config_name == "train" else []
    kept = [o for o in overrides if o not in {bad for bad, _ in problems}]
    while True:
        try:
            cfg = _compose(config_name, kept)
            break
        except (HydraException, OmegaConfBaseException) as err:
            bad, message = _composition_problem(err, kept)
            if bad is None:
                raise ConfigError(_first_lines(err)) from None
            problems.append((bad, message))
            kept.remove(bad)
    if problems:
        raise ConfigError(join_problems([message(cfg) for _, message in problems]))
    return cfg


def _missing_optional_choices(overrides: list[str]) -> list:
    """``(override, message(cfg))`` for each ``experiment=NAME`` without its file: the group
    is optional in the defaults list, so Hydra would skip a misspelled name silently and
    train the default setup."""
    from pathlib import Path

    from ncsn.config import config_dir

    folder, problems = Path(config_dir()) / "experiment", []
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    for override in overrides:
        key, _, name = override.partition("=")
        if key.lstrip("+") == "experiment" and name not in options:
            problems.append((override, _no_option("experiment", name, options)))
    return problems


def _no_option(group: str, choice: str, options: list[str]):
    """``message(cfg)`` for a group option that does not exist, the nearest one first."""
    near = difflib.get_close_matches(choice, options, n=1)
    hint = f"did you mean {group}={near[0]}? " if near else ""
    return lambda cfg: f"{group}={choice} is not an option; {hint}options: {', '.join(options)}"


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from ncsn.config import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def _composition_problem(err: Exception, overrides: list[str]):
    """``(override, message(cfg))`` for the override that ``err`` is about, the message
    made from the config composed without it; ``(None, None)`` where none can be named."""
    cause, options = err.__cause__, getattr(err, "options", None)
    full_key = getattr(cause, "full_key", None)
    if full_key and type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):
        bad = _override_of(overrides, full_key)
        return bad, lambda cfg: unknown_key_message(full_key, _keys_at(cfg, full_key))
    if full_key and type(cause).__name__ == "ValidationError":
        bad = _override_of(overrides, full_key)
        reason = str(cause).splitlines()[0]
        return bad, lambda cfg: f"{bad}: {reason}"
    group = re.search(r"Could not override '([^']+)'\.\s*No match in the defaults list", str(err))
    if group:                                    # group=NAME for a group this config lacks
        key = group.group(1)
        return (_override_of(overrides, key),
                lambda cfg: unknown_key_message(key, _keys_at(cfg, key)))
    found = re.search(r"Could not find '([^']+)/([^']+)'", str(err))
    if options is not None and found:
        group, choice = found.groups()
        return _override_of(overrides, group), _no_option(group, choice, options)
    return None, None


def _override_of(overrides: list[str], key: str) -> str | None:
    """The override that sets ``key`` (``key=...``, ``+key=...``, ``~key``), or None."""
    for override in overrides:
        if override.split("=", 1)[0].lstrip("+~") == key:
            return override
    return None


def _keys_at(cfg: DictConfig, full_key: str) -> list[str]:
    """The keys of the node that holds ``full_key`` (the top level for a bare key)."""
    parent = full_key.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def unknown_key_message(full_key: str, valid: list[str]) -> str:
    """``unknown key 'trainer.nsteps'; did you mean trainer.n_steps? valid keys in trainer:
    ...``: the nearest valid keys first, as a user fixes a typo from them."""
    parent, _, key = full_key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    near = difflib.get_close_matches(key, valid, n=3)
    hint = f"did you mean {' or '.join(prefix + k for k in near)}? " if near else ""
    where = f" in {parent}" if parent else ""
    listed = f"valid keys{where}: {', '.join(valid)}" if valid else ""
    return f"unknown key '{full_key}'; {hint}{listed}".rstrip("; ")


def check_keys(cfg: DictConfig, path: str = "") -> None:
    """Fail on keys that no schema declares. Hydra's ``+key=value`` adds keys past the
    schemas; a typo there would otherwise be ignored for a whole run."""
    import dataclasses

    schema = cfg._metadata.object_type
    if dataclasses.is_dataclass(schema):
        fields = sorted(f.name for f in dataclasses.fields(schema))
        for key in cfg.keys():
            if key not in fields:
                raise ConfigError(unknown_key_message(f"{path}{key}", fields))
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            check_keys(node, f"{path}{key}.")


def check_train(cfg: DictConfig) -> None:
    """A training config's values, all problems in one :class:`ConfigError`: the trainer's
    counts and the parts' compatibility (:func:`ncsn.registry.part_problems`)."""
    from ncsn.registry import part_problems

    problems = [f"trainer.{key} must be at least 1, got {cfg.trainer[key]}"
                for key in AT_LEAST_ONE if cfg.trainer[key] < 1]
    problems += part_problems(cfg)
    problems += resume_problems(cfg.trainer.resume)
    if problems:
        raise ConfigError(join_problems(problems))


def resume_problems(value) -> list[str]:
    """trainer.resume: auto, true, false, or a checkpoint file that exists."""
    from ncsn.checkpoint import CheckpointError, existing_checkpoint
    from ncsn.training.state import resume_mode

    try:
        if resume_mode(value) == "path":
            existing_checkpoint(value)
    except (ConfigError, CheckpointError) as err:
        return [f"trainer.resume={value}: {err} (trainer.resume takes auto, true, false or a "
                f"checkpoint file)"]
    return []


def check_ckpt_given(cfg: DictConfig) -> None:
    """``ncsn-sample`` needs a checkpoint (OmegaConf would raise MissingMandatoryValue), and
    ``ncsn-sample`` and ``ncsn-eval`` one that exists, checked before the output folder."""
    from ncsn.checkpoint import existing_checkpoint

    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("say which checkpoint to sample from: "
                          "ckpt=RUN_DIR/checkpoints/last.pt")
    check_sample_counts(cfg)
    if cfg.get("ckpt") is not None:
        existing_checkpoint(cfg.ckpt)


def check_sample_counts(cfg: DictConfig) -> None:
    """``n_samples`` and ``batch_size`` (ncsn-sample's may be null: its default) are counts
    of samples: at least 1."""
    problems = [f"{key} must be at least 1, got {cfg[key]}" for key in ("n_samples", "batch_size")
                if key in cfg and cfg[key] is not None and cfg[key] < 1]
    if problems:
        raise ConfigError(join_problems(problems))


def join_problems(problems: list[str]) -> str:
    """One line for one problem or several: ``2 problems: (1) ...; (2) ...``."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + " ".join(
        f"({i}) {p.rstrip('.')};" for i, p in enumerate(problems, 1)).rstrip(";")


def _first_lines(err: Exception) -> str:
    """Hydra's message on one line, without the config search path it appends."""
    lines = [line.strip() for line in str(err).split("Config search path")[0].splitlines()]
    return " ".join(line for line in lines if line)
