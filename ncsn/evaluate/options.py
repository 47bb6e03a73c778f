"""Options of the metrics (``ncsn-eval eval.KEY=VALUE``), the metric names, and the small
helpers the evaluation modules share."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from ncsn.registry import ConfigError

FID_SAMPLES = 50_000                # the papers' sample count; fewer biases FID upward


@dataclass
class EvalOptions:
    """How metrics are computed (``ncsn-eval eval.KEY=VALUE``)."""

    inception_weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth; null:
                                             # looked for in the torch hub cache
    inception_random_init: bool = False      # tests only: a random network, scores meaningless
    feature_batch_size: int = 50             # images per Inception forward pass
    is_splits: int = 10                      # Inception Score: mean and std over 10 splits
    kid_subsets: int = 100                   # KID: MMD^2 averaged over this many subsets
    kid_subset_size: int = 1000              # of this many features each
    kid_max_features: int = 10_000           # features kept for KID (a seeded uniform subset)
    stats_dir: Optional[str] = None          # reference statistics cache; null:
                                             # $XDG_CACHE_HOME/ncsn/stats (~/.cache/ncsn/stats)
    digits_classifier: Optional[str] = None  # null: ~/.cache/ncsn/digits_classifier.pt
    swd_projections: int = 256               # directions of the sliced Wasserstein distance
    score_error_points: int = 2000           # points per noise level for score_error
    nll_probes: int = 1                      # nll: Hutchinson probes per ODE solve
    nll_probe: str = "rademacher"            # rademacher | gaussian
    nll_exact_divergence: bool = False       # exact divergence (d backward passes; small d)
    nll_rtol: float = 1e-5                   # RK45 tolerances of the probability-flow ODE
    nll_atol: float = 1e-5
    nll_sigma_min: Optional[float] = None    # null: the table's smallest sigma
    nll_sigma_max: Optional[float] = None    # null: the table's largest sigma
    progress: bool = True                    # progress bars (only when stderr is a terminal)


@dataclass(frozen=True)
class Metric:
    kind: str                  # inception | digits | points | score: what it needs
    key: str                   # the scalar that ranks checkpoints in a sweep
    lower_is_better: bool


METRICS = {
    "fid": Metric("inception", "fid", True),        # Frechet Inception distance (Heusel 2017)
    "is": Metric("inception", "is", False),         # Inception Score (Salimans et al. 2016)
    "kid": Metric("inception", "kid", True),        # Kernel Inception distance (Binkowski 2018)
    "digits": Metric("digits", "digits_fid", True), # digits classifier: FID in its feature
                                                    # space, confidence, class histogram
    "swd": Metric("points", "swd", True),           # sliced Wasserstein distance to fresh data
    "energy": Metric("points", "energy", True),     # energy distance to fresh data
    "score_error": Metric("score", "score_error", True),   # vs the exact mixture score, per
                                                           # sigma (mean relative error)
    "nll": Metric("likelihood", "nll", True),       # test split's -log p (probability-flow
                                                    # ODE): nats per sample, bits/dim
}


def parse_metrics(metric: Any, kind: str, dataset_name: str | None = None,
                  has_net: bool = False) -> list[str]:
    """The metric names of ``metric`` (a name, a list, or a comma-separated string; ``auto``
    picks by data) checked against the data: ``kind`` is "images" or "points"."""
    if isinstance(metric, str):
        names = [m.strip() for m in metric.split(",") if m.strip()]
    else:
        names = [str(m) for m in metric]
    valid = ", ".join(METRICS)
    if names in ([], ["auto"]):
        names = _auto_metrics(kind, dataset_name, has_net)
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"unknown metric {name!r}; choose from {valid} (several: "
                              f"metric=[fid,is,kid])")
        _check_applicable(name, kind, dataset_name, has_net)
    return list(dict.fromkeys(names))


def _auto_metrics(kind: str, dataset_name: str | None, has_net: bool) -> list[str]:
    if kind == "points":
        extra = ["score_error"] if dataset_name == "gaussian_mixture" and has_net else []
        return ["swd", "energy", *extra]
    return ["digits"] if dataset_name == "digits" else ["fid"]


def _check_applicable(name: str, kind: str, dataset_name: str | None, has_net: bool) -> None:
    metric_kind = METRICS[name].kind
    for_points = ("swd", "energy", "score_error")
    if kind == "points" and metric_kind in ("inception", "digits"):
        raise ConfigError(f"metric={name} scores images, but these samples are points; "
                          f"use {', '.join(for_points)}")
    if kind == "images" and metric_kind in ("points", "score"):
        raise ConfigError(f"metric={name} scores 2-D points, but these samples are images; "
                          f"use fid, is, kid or digits")
    if name == "nll" and not has_net:
        raise ConfigError("metric=nll scores the test split under a checkpoint's network; "
                          "give ckpt=PATH or run=RUN_DIR, not samples")
    if name == "score_error" and not (has_net and dataset_name == "gaussian_mixture"):
        raise ConfigError("metric=score_error compares a checkpoint's network with the exact "
                          "score of dataset=gaussian_mixture; give ckpt= of such a run")


def as_options(node) -> EvalOptions:
    if isinstance(node, EvalOptions):
        return node
    if isinstance(node, DictConfig):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalOptions), node))
    return EvalOptions(**(node or {}))


def as_dict(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def progress(batches: Iterable[Tensor], total: int | None, desc: str,
              options: EvalOptions) -> Iterator[Tensor]:
    """``batches`` with a progress bar over samples (only on a terminal)."""
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True,
              disable=not (options.progress and sys.stderr.isatty())) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))
