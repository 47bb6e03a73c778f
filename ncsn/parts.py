"""What every kind of part shares: the error a config that cannot work raises, what a sampler
or an objective may ask of the network it runs with, and the tables parts register in.

A sampler (``ncsn.samplers``) or an objective (``ncsn.objectives``) is one class that
declares its config schema, its checks and how it runs, registered by name with a decorator;
``ncsn.registry`` looks it up by ``cfg.name``. A part registered outside this package (a
notebook's, a test's) is composable as ``sampler=NAME`` / ``loss=NAME`` with its schema's
defaults, without a YAML file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A configuration that composes but cannot work (say, an unconditional network with an
    annealed objective). The message says what to change."""


@dataclass(frozen=True)
class Network:
    """What a sampler or an objective may ask of the network (from ``cfg.model``):
    ``conditional``: it takes sigma, ``net(x, sigma)``; ``takes_sigma_values``: any sigma,
    not only the table's levels; ``flow``: a normalizing flow (exact log p(x), exact
    samples); ``batch_statistics``: its training-mode output for one sample depends on the
    rest of the batch (a batch-normalised flow); ``augment_dim``: the augmentation labels it
    embeds (EDM's non-leaky augmentation; None: it cannot take them)."""

    name: str
    conditional: bool
    takes_sigma_values: bool
    flow: bool
    batch_statistics: bool = False
    embedding: str | None = None
    augment_dim: int | None = None     # model.augment_dim; None: the network has no such option

    @property
    def table_only(self) -> str:
        """``model=ncsn can only look sigma up in its table`` (for messages)."""
        embedding = f" (embedding={self.embedding})" if self.embedding else ""
        return f"model={self.name}{embedding} can only look sigma up in its table"

    @property
    def alternative(self) -> str:
        """What to choose instead of a network that can only look sigma up in its table."""
        return ("model.embedding=log_sigma" if self.name == "cond_mlp"
                else "model=ncsnv2 or model=unet")


def register_part(table: dict, group: str, *names: str):
    """A class decorator: ``table[name] = cls`` for each of ``names`` (default: the schema's
    ``name``), and the schema ``cls.Config`` stored in Hydra's ConfigStore as
    ``schema/GROUP/NAME`` (what the YAML files extend) and, for a part with no YAML file
    among ncsn's configs, as the option ``GROUP/NAME`` itself."""
    def register(cls):
        store = ConfigStore.instance()
        for name in names or (cls.Config.name,):
            table[name] = cls
            store.store(group=f"schema/{group}", name=name, node=cls.Config)
            if not _has_yaml(group, name):
                store.store(group=group, name=name, node=cls.Config(name=name))
        return cls
    return register


def _has_yaml(group: str, name: str) -> bool:
    return (Path(config_dir()) / group / f"{name}.yaml").is_file()


def config_dir() -> str:
    """The folder holding ``train.yaml``: ``ncsn/configs`` in a built wheel, the
    repository's top-level ``configs/`` in an editable install."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"ncsn's configs/ folder was not found next to {package}; "
                            f"reinstall the package with pip install -e .")
