"""What the command-line entry points share: the key check and one-line errors."""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Callable

from omegaconf import DictConfig

from ncsn.checkpoint import CheckpointError
from ncsn.registry import ConfigError

log = logging.getLogger("ncsn")


def check_keys(cfg: DictConfig, path: str = "") -> None:
    """Fail on keys that no schema declares. Hydra's ``+key=value`` adds keys past the
    schemas; a typo there would otherwise be ignored for a whole run."""
    schema = cfg._metadata.object_type
    if dataclasses.is_dataclass(schema):
        fields = {f.name for f in dataclasses.fields(schema)}
        for key in cfg.keys():
            if key not in fields:
                raise ConfigError(f"unknown key '{path}{key}'; valid keys here: "
                                  f"{', '.join(sorted(fields))}")
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            check_keys(node, f"{path}{key}.")


def run_cli(prog: str, job: Callable[[], object], expected: tuple = ()) -> object:
    """Run ``job``; known failures become one line on stderr and a non-zero exit status:
    2 for bad input (config, checkpoint, data), 1 for a diverged run, 128 + signal number
    for an interrupted one."""
    from ncsn.train import NonFiniteLossError, TrainingInterrupted

    def fail(message: str, code: int):
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(code)

    try:
        return job()
    except (ConfigError, CheckpointError, FileNotFoundError, *expected) as err:
        fail(str(err), 2)
    except NonFiniteLossError as err:
        fail(str(err), 1)
    except TrainingInterrupted as err:
        print(f"{prog}: {err}; continue with trainer.resume=true "
              f"hydra.run.dir={err.path.parent.parent}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        fail("interrupted", 130)
