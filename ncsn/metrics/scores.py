"""Inception Score, Kernel Inception Distance, and streaming feature extraction.

The FID itself is ``frechet_distance`` on the ``FeatureStats`` that ``extract_features``
accumulates (see ``ncsn.metrics.frechet``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ncsn.metrics.frechet import FeatureStats


def _as_f64(a: np.ndarray | Tensor) -> Tensor:
    return a.detach().double() if isinstance(a, Tensor) else torch.as_tensor(a, dtype=torch.float64)


def _looks_like_probs(a: Tensor) -> bool:
    return bool((a >= 0).all() and torch.allclose(a.sum(1), torch.ones_like(a[:, 0]), atol=1e-4))


def split_bounds(n: int, splits: int) -> list[tuple[int, int]]:
    """Row ranges [i N // splits, (i + 1) N // splits) of the Inception Score's parts.

    Where ``splits`` does not divide N, these are OpenAI's improved-GAN code's and
    torch-fidelity's boundaries (the longer parts fall where the floor steps), not
    ``tensor_split``'s (the first N % splits parts one row longer).
    """
    return [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]


def inception_score(logits_or_probs: np.ndarray | Tensor, splits: int = 10,
                    probs: bool | None = None) -> tuple[float, float]:
    """Inception Score exp( E_x KL(p(y|x) || p(y)) ) (Salimans et al. 2016, section 4).

    logits_or_probs: (N, K) classifier logits or class probabilities; ``probs=None`` takes
    rows that are non-negative and sum to one as probabilities, anything else as logits.
    As in the reference code, the N rows are cut in order into ``splits`` parts at
    :func:`split_bounds`, the
    marginal p(y) is the mean of p(y|x) within each part, and the mean and (population)
    standard deviation of the per-part scores are returned. Computed in float64.
    """
    a = _as_f64(logits_or_probs)
    if a.ndim != 2 or a.shape[0] < splits:
        raise ValueError(f"need (N, K) predictions with N >= splits={splits}, got {tuple(a.shape)}")
    is_probs = _looks_like_probs(a) if probs is None else probs
    log_p = torch.log(a) if is_probs else torch.log_softmax(a, dim=1)           # (N, K)
    p = log_p.exp()
    scores = []
    for start, end in split_bounds(len(a), splits):
        part_p, part_log_p = p[start:end], log_p[start:end]                      # (n_i, K)
        log_py = part_p.mean(0).log()                                            # (K,)
        # KL(p(y|x) || p(y)) = sum_y p (log p - log p(y)); 0 log 0 = 0
        kl = torch.where(part_p > 0, part_p * (part_log_p - log_py), 0.0).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x^T y / d + 1)^3, the KID kernel (Binkowski et al. 2018, section 2.3).

    x: (M, d), y: (N, d) -> (M, N).
    """
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 estimate with the polynomial kernel (Gretton et al. 2012, eq. 3).

    x: (m, d), y: (n, d). MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1))
    + sum_{i != j} k(y_i, y_j) / (n (n-1)) - 2 sum_{i, j} k(x_i, y_j) / (m n).
    """
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * k_xy.mean())


def kid(feats1: np.ndarray | Tensor, feats2: np.ndarray | Tensor, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std of MMD^2_u over subsets.

    feats1: (N1, d), feats2: (N2, d) features (Inception pool_3 for KID proper). Each of
    ``subsets`` rounds draws ``subset_size`` rows of each set without replacement (seeded;
    the size is capped at min(N1, N2)) and computes the unbiased polynomial-kernel MMD^2.
    Unbiased, so it is centred on zero (and can be negative) for equal distributions.
    Computed in float64 on the device of ``feats1`` if it is a tensor.
    """
    x = _as_f64(feats1)
    y = _as_f64(feats2).to(x.device)
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least two features per set, "
                         f"got {x.shape[0]} and {y.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ix = torch.randperm(x.shape[0], generator=g)[:size].to(x.device)
        iy = torch.randperm(y.shape[0], generator=g)[:size].to(y.device)
        values.append(mmd2_unbiased(x[ix], y[iy]))
    return float(np.mean(values)), float(np.std(values))


@dataclass
class ExtractedFeatures:
    """What ``extract_features`` returns: the running statistics, and optionally the
    features (N, 2048) (for KID) and logits (N, 1008) (for IS), float32 on the CPU."""

    stats: FeatureStats
    features: Tensor | None = None
    logits: Tensor | None = None


def _to_unit_rgb(batch: Tensor | tuple | list) -> Tensor:
    """A loader item -> float images (B, 3, H, W) in [0, 1]; checks the range."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected image batches (B, 1 or 3, H, W), got {tuple(x.shape)}")
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"expected images in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                         f"(map [-1, 1] images with (x + 1) / 2)")
    return x.clamp(0, 1).expand(-1, 3, -1, -1)                      # 1 channel -> 3


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[Tensor | tuple | list],
                     keep_features: bool = False, keep_logits: bool = False,
                     device: str | torch.device | None = None) -> ExtractedFeatures:
    """Run the FID Inception network over image batches, one batch in memory at a time.

    model: called as ``model(x) -> (features (B, D), logits (B, K))``, e.g.
        ``fid_inception_v3(...)``. batches: an iterable of (B, C, H, W) tensors in [0, 1]
        (C = 1 is repeated to 3; uint8 is divided by 255), or of tuples such as
        ``(images, labels)`` from a DataLoader, whose first item is used.
    Accumulates the features' FeatureStats (float64); with ``keep_features`` /
    ``keep_logits`` also returns the (N, D) features / (N, K) logits on the CPU.
    """
    if device is None:
        device = next(model.parameters()).device
    model.eval()
    stats, feats_kept, logits_kept = FeatureStats(), [], []
    for batch in batches:
        feats, logits = model(_to_unit_rgb(batch).to(device))
        stats.update(feats)
        if keep_features:
            feats_kept.append(feats.float().cpu())
        if keep_logits:
            logits_kept.append(logits.float().cpu())
    return ExtractedFeatures(stats, torch.cat(feats_kept) if feats_kept else None,
                             torch.cat(logits_kept) if logits_kept else None)
