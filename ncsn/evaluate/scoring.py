"""Scoring: the instruments (Inception network, reference, digits classifier), a stream
of samples scored in one pass, checkpoints sampled and scored, the checkpoints of a run."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from ncsn import distributed, registry
from ncsn.checkpoint import STEP_FILE, CheckpointError
from ncsn.cost import sampling_cost
from ncsn.evaluate.nll import score_nll
from ncsn.evaluate.options import FID_SAMPLES, METRICS, EvalOptions, as_dict, progress
from ncsn.evaluate.reference import Reference
from ncsn.evaluate.streams import ImageScorer, count_non_finite
from ncsn.metrics import (energy_distance, fid_inception_v3, frechet_distance, kid,
                          load_digits_classifier, score_error, sliced_wasserstein)
from ncsn.metrics.digits import digits_metrics
from ncsn.registry import ConfigError

log = logging.getLogger(__name__)
REFERENCE_SEED_OFFSET = 1000        # fresh 2-D data: training drew with seed and seed + 1


@dataclass
class Instruments:
    """The measuring instruments, built once and shared by all checkpoints of a sweep."""

    options: EvalOptions
    device: torch.device
    inception: Any = None                 # FIDInceptionV3, when an Inception metric is asked
    reference: Reference | None = None    # for FID and KID
    classifier: Any = None                # DigitsClassifier, for metric=digits

    @classmethod
    def build(cls, metrics: Sequence[str], options: EvalOptions,
              device: str | torch.device = "cpu") -> "Instruments":
        """Load what ``metrics`` need; a missing Inception weights file fails here, before
        any sampling (InceptionWeightsNotFound, one line)."""
        tools = cls(options, _device(device))
        if any(METRICS[m].kind == "inception" for m in metrics):
            if options.inception_random_init and options.inception_weights is not None:
                raise ConfigError("give eval.inception_weights=PATH or "
                                  "eval.inception_random_init=true, not both")
            tools.inception = fid_inception_v3(options.inception_weights,
                                               options.inception_random_init, tools.device)
        if "digits" in metrics:
            tools.classifier = load_digits_classifier(options.digits_classifier).to(tools.device)
        return tools


def _device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu "
                          f"or auto")
    return torch.device(name)


@dataclass
class Scores:
    """What an evaluation found: scalar metrics, their sample count, tables, notes."""

    n_samples: int
    values: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.source.get("step", 0))

    def to_json(self) -> dict:
        finite = lambda v: v if isinstance(v, (int, str)) or math.isfinite(v) else None  # noqa: E731
        return {"source": self.source, "n_samples": self.n_samples,
                "metrics": {k: finite(v) for k, v in self.values.items()},
                **self.details, "notes": self.notes}


@dataclass
class Measured:
    """What one batch of samples adds to the scores, computed on the rank that drew it and
    small enough to gather: its size, the Inception features and logits of each chunk, its
    count of non-finite samples, and the samples themselves for digits (B, 1, 8, 8) and
    points (B, d)."""

    n: int
    inception: list = field(default_factory=list)     # [(feats (b, 2048), logits (b, 1008))]
    non_finite: int = 0
    kept: Tensor | None = None

    def __len__(self) -> int:
        return self.n


class SampleScorer:
    """Scores ``n_total`` samples in one pass: :meth:`measure` each batch (on any rank),
    :meth:`add` the measures in the samples' order (on one), then :meth:`scores`. Images
    (B, C, H, W) in [0, 1] for fid, is, kid and digits; points (B, d) for swd and energy
    against ``reference_points``, a callable n -> (n, d) tensor of fresh data. Built on
    every rank before any sampling, so that a bad setting fails everywhere at once."""

    def __init__(self, metrics: Sequence[str], tools: Instruments, n_total: int,
                 reference_points=None, seed: int = 0):
        self.metrics, self.tools, self.seed = list(metrics), tools, seed
        self.reference_points = reference_points
        self.inception = [m for m in metrics if METRICS[m].kind == "inception"]
        self.image_scorer = ImageScorer(tools.inception, self.inception, tools.options,
                                        n_total, seed) if self.inception else None
        self.kept: list[Tensor] = []          # points, or 8x8 digits: small enough to hold
        self.n = 0

    def measure(self, batch: Tensor) -> Measured:
        """A batch's part of the scores; its tensors on the CPU when the ranks gather them."""
        out = Measured(len(batch))
        if self.image_scorer is not None:
            out.inception = self.image_scorer.embed(batch)
            out.non_finite = count_non_finite(batch)
            if distributed.is_distributed():
                out.inception = [(f.cpu(), logits.cpu()) for f, logits in out.inception]
        if "digits" in self.metrics:
            out.kept = _as_digits(batch)
        elif batch.ndim == 2:
            out.kept = batch.double()
        return out

    def add(self, measured: Measured) -> None:
        self.n += measured.n
        if self.image_scorer is not None:
            self.image_scorer.add(measured.inception, measured.non_finite)
        if measured.kept is not None:
            self.kept.append(measured.kept)

    def scores(self) -> Scores:
        scores = Scores(self.n)
        if self.image_scorer is not None:
            _inception_scores(self.image_scorer, self.inception, self.tools, scores)
        if "digits" in self.metrics:
            _digits_scores(torch.cat(self.kept), self.tools, scores)
        if any(METRICS[m].kind == "points" for m in self.metrics):
            _point_scores(torch.cat(self.kept), self.metrics, self.tools,
                          self.reference_points, self.seed, scores)
        return scores


def score_stream(batches: Iterable[Tensor], n_total: int, metrics: Sequence[str],
                 tools: Instruments, reference_points=None, seed: int = 0) -> Scores:
    """Score ``n_total`` samples arriving in batches in this process (see
    :class:`SampleScorer`)."""
    scorer = SampleScorer(metrics, tools, n_total, reference_points, seed)
    for measured in progress(map(scorer.measure, batches), n_total, "scoring", tools.options):
        scorer.add(measured)
    return scorer.scores()


def _inception_scores(scorer: ImageScorer, metrics: Sequence[str], tools: Instruments,
                      scores: Scores) -> None:
    ref, opts = tools.reference, tools.options
    scores.details["inception"] = tools.inception.weights_source
    if opts.inception_random_init:
        scores.notes.append("the Inception network is RANDOMLY INITIALISED (a test setting): "
                            "these scores are meaningless")
    if scorer.non_finite:
        scores.notes.append(f"{scorer.non_finite} samples hold NaN or inf values")
    if "fid" in metrics or "kid" in metrics:
        scores.details["reference"] = ref.describe()
    if "fid" in metrics:
        stats = scorer.stats
        scores.values["fid"] = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
        if stats.n < FID_SAMPLES:
            scores.notes.append(f"FID on {stats.n} < {FID_SAMPLES} samples is biased upward: "
                                f"compare only FIDs computed on the same number of samples")
    if "is" in metrics:
        scores.values["is"], scores.values["is_std"] = scorer.inception_score.result()
    if "kid" in metrics:
        mean, std = kid(scorer.features.rows, torch.from_numpy(ref.features), opts.kid_subsets,
                        opts.kid_subset_size)
        scores.values["kid"], scores.values["kid_std"] = mean, std


def _as_digits(images: Tensor) -> Tensor:
    """Single-channel images (B, 1, H, W) -> (B, 1, 8, 8) for the digits classifier."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ConfigError(f"metric=digits needs single-channel images, got "
                          f"{tuple(images.shape[1:])}")
    if images.shape[-2:] != (8, 8):
        images = F.interpolate(images.float(), size=(8, 8), mode="area")
    return images.float().cpu()


def _digits_scores(digits: Tensor, tools: Instruments, scores: Scores) -> None:
    result = digits_metrics(digits.to(tools.device), tools.classifier)
    scores.values["digits_fid"] = result["fid"]
    scores.values["digits_confidence"] = result["confidence"]
    scores.details["digits_histogram"] = result["histogram"]


def _point_scores(samples: Tensor, metrics: Sequence[str], tools: Instruments,
                  reference_points, seed: int, scores: Scores) -> None:
    if reference_points is None:
        raise ConfigError("metric=swd / energy on samples needs the data to compare with: "
                          "dataset=NAME (a 2-D dataset such as swiss_roll)")
    data = reference_points(len(samples)).double()
    finite = torch.isfinite(samples).all(1)
    if not finite.all():
        scores.notes.append(f"{int((~finite).sum())} samples hold NaN or inf values")
    scores.details["reference"] = f"{len(data)} fresh points of the dataset"
    if "swd" in metrics:
        scores.values["swd"] = sliced_wasserstein(samples, data, tools.options.swd_projections,
                                                  seed)
    if "energy" in metrics:
        scores.values["energy"] = energy_distance(samples, data)


def toy_reference(dataset_cfg, seed: int = 0):
    """n -> (n, 2) fresh points of a 2-D dataset config, drawn with a seed its training run
    did not use (dataset.seed + 1000 + seed)."""
    from ncsn.data.toy import make_toy

    cfg = as_dict(dataset_cfg)
    if cfg["name"] not in registry.TOY_DATASETS:
        raise ConfigError(f"dataset={cfg['name']} is not a 2-D dataset; swd and energy compare "
                          f"with one of {', '.join(sorted(registry.TOY_DATASETS))}")
    params = {k: v for k, v in cfg.items() if k not in ("name", "n_samples", "n_test", "seed")}
    fresh = int(cfg.get("seed", 0)) + REFERENCE_SEED_OFFSET + seed
    return lambda n: make_toy(cfg["name"], n, seed=fresh, **params)


# ----------------------------------------------------------------------------- checkpoints
@dataclass
class Draw:
    """How samples are drawn from a checkpoint."""

    n_samples: int = FID_SAMPLES
    batch_size: int = 100
    seed: int = 0
    sampler_overrides: dict = field(default_factory=dict)   # sampler key -> value
    sampler_replace: dict | None = None                     # another sampler config
    use_ema: bool = True
    device: str = "auto"


def checkpoint_kind(ckpt: dict) -> tuple[str, str]:
    """("images" or "points", dataset name) of a checkpoint."""
    return ("images" if len(ckpt["data_shape"]) == 3 else "points",
            ckpt["config"]["dataset"]["name"])


def score_checkpoint(ckpt: dict, metrics: Sequence[str], draw: Draw, tools: Instruments,
                     path: str | Path | None = None) -> Scores:
    """Draw ``draw.n_samples`` samples from a checkpoint dict in batches and score them
    (2-D data against fresh points of its dataset; score_error against the exact score)."""
    from ncsn.generate import load_sampler, sampler_config

    sampler_cfg = sampler_config(ckpt["config"]["sampler"], draw.sampler_overrides,
                                 draw.sampler_replace)
    kind, name = checkpoint_kind(ckpt)
    reference = toy_reference(ckpt["config"]["dataset"], draw.seed) if kind == "points" else None
    sampler = load_sampler(ckpt, sampler_cfg, draw.use_ema, tools.device)
    sample_metrics = [m for m in metrics if METRICS[m].kind not in ("score", "likelihood")]
    scores = Scores(0)
    if sample_metrics:
        scores = _draw_and_score(sampler, sample_metrics, draw, tools, reference)
    scores.source = {"ckpt": str(path) if path else None, "step": int(ckpt["step"]),
                     "dataset": name, "sampler": OmegaConf.to_container(sampler_cfg)}
    if sampler.nfe:
        scores.source["nfe"] = sampler.nfe
        scores.notes.append(f"NFE: {sampler.nfe_summary()} per sample "
                            f"(sampler={sampler_cfg.name})")
    if "score_error" in metrics:
        _score_error(ckpt, draw, tools, scores)
    if "nll" in metrics:
        score_nll(ckpt, draw, tools, scores)
    return scores


def _draw_and_score(sampler, metrics: Sequence[str], draw: Draw, tools: Instruments,
                    reference) -> Scores:
    """Draw and score ``draw.n_samples`` samples. Under torch.distributed each rank draws
    and measures its share (Inception features included); rank 0 adds the gathered
    measures in the samples' order, so its scores are one process's (the other ranks
    return empty scores)."""
    scorer = SampleScorer(metrics, tools, draw.n_samples, reference, draw.seed)
    if distributed.is_main():
        log.info("%s", sampling_cost(sampler, draw.n_samples, draw.batch_size,
                                     distributed.world_size()))
    measured = sampler.batches(draw.n_samples, draw.batch_size, draw.seed,
                               on_rank=scorer.measure)
    if not distributed.is_main():
        for _ in measured:                  # this rank's share; rank 0 gathers it
            pass
        return Scores(0)
    for m in progress(measured, draw.n_samples, "scoring", tools.options):
        scorer.add(m)
    return scorer.scores()


def _score_error(ckpt: dict, draw: Draw, tools: Instruments, scores: Scores) -> None:
    """Per-sigma error against the exact score of the sigma-perturbed Gaussian mixture."""
    from ncsn.data.toy import GaussianMixture
    from ncsn.generate import model_from_checkpoint

    cfg = ckpt["config"]
    mixture = GaussianMixture.create(cfg["dataset"]["means"], cfg["dataset"]["weights"],
                                     cfg["dataset"]["std"])
    net = model_from_checkpoint(ckpt, draw.use_ema, tools.device)
    # an unconditional network learns the clean score: compare it at sigma = 0
    sigmas = ckpt["sigmas"] if registry.is_conditional(OmegaConf.create(cfg["model"])) else [0.0]
    table = score_error(net, mixture, sigmas, tools.options.score_error_points, draw.seed)
    scores.values["score_error"] = float(np.mean(table["relative"]))
    scores.details["score_error"] = table
    scores.details["score_error_points"] = tools.options.score_error_points


def sweep_checkpoints(run_dir: str | Path) -> list[Path]:
    """RUN_DIR/checkpoints/step_*.pt by step, or [last.pt] when there are no step files."""
    folder = Path(run_dir).expanduser() / "checkpoints"
    if not Path(run_dir).expanduser().is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    steps = sorted((p for p in folder.glob("step_*.pt") if STEP_FILE.match(p.name)),
                   key=lambda p: int(STEP_FILE.match(p.name).group(1)))
    if steps:
        return steps
    if (folder / "last.pt").is_file():
        return [folder / "last.pt"]
    raise CheckpointError(f"no checkpoints in {folder} (expected step_*.pt or last.pt written "
                          f"by ncsn-train)")


def best_of(results: Sequence[Scores], metric: str) -> Scores:
    """The result with the best value of ``metric``'s key (lowest FID, highest IS...);
    NaN never wins."""
    m = METRICS[metric]

    def rank(scores: Scores) -> float:
        value = scores.values[m.key]
        if not math.isfinite(value):
            return math.inf
        return value if m.lower_is_better else -value
    return min(results, key=rank)
