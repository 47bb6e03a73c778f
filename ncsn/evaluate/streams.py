"""Streaming accumulators: Inception features of image batches reduced as they pass to
what FID, IS and KID need, so that no sample and no full feature matrix is held."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ncsn.evaluate.options import EvalOptions
from ncsn.metrics import FeatureStats
from ncsn.metrics.scores import split_bounds
from ncsn.registry import ConfigError


class Reservoir:
    """A uniform random subset of at most ``k`` rows of a stream (Vitter's Algorithm R),
    seeded; holds (<= k, D) float32 on the CPU."""

    def __init__(self, k: int, seed: int = 0):
        self.k, self.seen, self.rows = k, 0, None
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().float().cpu()
        if self.rows is None:
            self.rows = rows.new_empty(0, rows.shape[1])
        fill = max(0, min(self.k - len(self.rows), len(rows)))
        self.rows = torch.cat([self.rows, rows[:fill]])
        rest = rows[fill:]
        seen = self.seen + fill
        # row i of the rest (the (seen + i + 1)-th of the stream) replaces slot j ~ U{0..seen+i}
        slots = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64)
                 * (seen + 1 + torch.arange(len(rest)))).long()
        for i in (slots < self.k).nonzero().flatten().tolist():
            self.rows[slots[i]] = rest[i]
        self.seen += len(rows)


class InceptionScoreStream:
    """The Inception Score of N logits seen in batches, equal to
    ``ncsn.metrics.inception_score`` on all of them: the N rows are cut in order into
    ``splits`` parts at OpenAI's boundaries (``split_bounds``), and per part

        IS = exp( E_x KL(p(y|x) || p(y)) ) = exp( E_x sum_y p log p - sum_y p(y) log p(y) )

    with p(y) the part's mean of p(y|x), so only sums per part are kept."""

    def __init__(self, n_total: int, splits: int = 10):
        if n_total < splits:
            raise ConfigError(f"the Inception Score with eval.is_splits={splits} needs at least "
                              f"{splits} samples, got {n_total}")
        self.ends = torch.tensor([end for _, end in split_bounds(n_total, splits)])  # (splits,)
        self.n_total, self.seen = n_total, 0
        self.count = torch.zeros(splits, dtype=torch.float64)
        self.sum_plogp = torch.zeros(splits, dtype=torch.float64)
        self.sum_p: Tensor | None = None                                       # (splits, K)

    def update(self, logits: Tensor) -> None:
        log_p = torch.log_softmax(logits.detach().double().cpu(), dim=1)       # (B, K)
        p = log_p.exp()
        part = torch.bucketize(torch.arange(self.seen, self.seen + len(p)), self.ends, right=True)
        if self.sum_p is None:
            self.sum_p = torch.zeros(len(self.ends), p.shape[1], dtype=torch.float64)
        self.sum_p.index_add_(0, part, p)
        self.sum_plogp.index_add_(0, part, torch.xlogy(p, p).sum(1))
        self.count.index_add_(0, part, torch.ones(len(p), dtype=torch.float64))
        self.seen += len(p)

    def result(self) -> tuple[float, float]:
        if self.seen != self.n_total:
            raise RuntimeError(f"expected {self.n_total} samples for the Inception Score, "
                               f"saw {self.seen}")
        marginal = self.sum_p / self.count[:, None]                            # (splits, K)
        kl = self.sum_plogp / self.count - torch.xlogy(marginal, marginal).sum(1)
        scores = kl.exp().numpy()
        return float(scores.mean()), float(scores.std())


class ImageScorer:
    """Runs image batches through the FID Inception network once and keeps what FID, IS and
    KID need: the features' running mean and covariance, the IS sums, a feature subset."""

    def __init__(self, model, metrics: Sequence[str], options: EvalOptions,
                 n_total: int | None = None, seed: int = 0):
        self.model, self.options = model, options
        self.device = next(model.parameters()).device
        self.stats = FeatureStats()
        self.inception_score = (InceptionScoreStream(n_total, options.is_splits)
                                if "is" in metrics else None)
        self.features = Reservoir(options.kid_max_features, seed) if "kid" in metrics else None
        self.non_finite = 0

    @torch.no_grad()
    def embed(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Images (B, C, H, W) in [0, 1], C = 1 (repeated to 3) or 3 -> the Inception pool
        features (b, 2048) and logits (b, 1008) of each chunk of ``feature_batch_size``.
        Needs only the network: any rank can run it on its own samples."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"Inception metrics need images (B, 1 or 3, H, W), got "
                              f"{tuple(images.shape)}")
        chunks = []
        for chunk in images.split(self.options.feature_batch_size):
            x = chunk.to(self.device, torch.float32).expand(-1, 3, -1, -1)
            chunks.append(self.model(x))
        return chunks

    def add(self, chunks: Sequence[tuple[Tensor, Tensor]], non_finite: int = 0) -> None:
        """Accumulate :meth:`embed`'s chunks, in the order of the samples."""
        self.non_finite += non_finite
        for feats, logits in chunks:
            self.stats.update(feats)
            if self.inception_score is not None:
                self.inception_score.update(logits)
            if self.features is not None:
                self.features.add(feats)

    def update(self, images: Tensor) -> None:
        """Images (B, C, H, W) in [0, 1], C = 1 (repeated to 3) or 3."""
        self.add(self.embed(images), count_non_finite(images))


def count_non_finite(batch: Tensor) -> int:
    """How many samples of ``batch`` (B, ...) hold a NaN or an infinity."""
    return int((~torch.isfinite(batch.flatten(1))).any(1).sum())
