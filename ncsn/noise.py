"""Noise-level (sigma) schedules.

Sigmas are ordered from largest to smallest, ``sigmas[0] = sigma_begin > ... >
sigmas[-1] = sigma_end``, as in the NCSN papers.
"""
from __future__ import annotations

import math

import torch


def geometric_sigmas(sigma_begin: float, sigma_end: float, num_scales: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sigma_i = sigma_begin * (sigma_end / sigma_begin) ** (i / (L - 1)), i = 0..L-1.

    Returns a tensor of shape ``(num_scales,)``, largest first (NCSN, section 4.2).
    """
    if not sigma_begin > sigma_end > 0:
        raise ValueError(f"need sigma_begin > sigma_end > 0, got sigma_begin={sigma_begin}, "
                         f"sigma_end={sigma_end}")
    if num_scales < 2:
        raise ValueError(f"num_scales must be at least 2, got {num_scales}")
    i = torch.arange(num_scales, dtype=torch.float64)
    sigmas = sigma_begin * (sigma_end / sigma_begin) ** (i / (num_scales - 1))
    return sigmas.to(dtype)


def largest_pairwise_distance(x: torch.Tensor, n_subsample: int = 2000,
                              generator: torch.Generator | None = None) -> float:
    """Largest Euclidean distance between two points of ``x`` (shape ``(N, ...)``).

    NCSNv2, Technique 1: sigma_1 should be as large as the maximum pairwise distance in
    the data. Measured on a random subsample of ``n_subsample`` points to bound the cost.
    """
    x = x.reshape(x.shape[0], -1).double()
    if x.shape[0] > n_subsample:
        idx = torch.randperm(x.shape[0], generator=generator)[:n_subsample]
        x = x[idx]
    largest = 0.0
    for chunk in x.split(512):
        largest = max(largest, torch.cdist(chunk, x).max().item())
    return largest


def _normal_cdf(t: float) -> float:
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


def gamma_criterion(gamma: float, dim: int) -> float:
    """NCSNv2, Technique 2: Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma).

    The probability mass that one noise level's typical shell puts within three standard
    deviations of the next level's; NCSNv2 asks for about 0.5.
    """
    centre = math.sqrt(2.0 * dim) * (gamma - 1.0)
    return _normal_cdf(centre + 3.0 * gamma) - _normal_cdf(centre - 3.0 * gamma)


def num_scales_for(sigma_begin: float, sigma_end: float, dim: int, target: float = 0.5,
                   max_scales: int = 100_000) -> int:
    """Smallest L whose geometric ratio gamma = (sigma_begin/sigma_end)^(1/(L-1)) meets
    ``gamma_criterion(gamma, dim) >= target`` (NCSNv2, Technique 2)."""
    log_ratio = math.log(sigma_begin / sigma_end)
    for num_scales in range(2, max_scales + 1):
        gamma = math.exp(log_ratio / (num_scales - 1))
        if gamma_criterion(gamma, dim) >= target:
            return num_scales
    raise ValueError(f"no number of scales up to {max_scales} meets the gamma rule "
                     f"for sigma {sigma_begin} -> {sigma_end} in dimension {dim}")


def sigma_index(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Index of the table entry nearest to each sigma (nearest in log sigma).

    ``sigma`` has shape ``(B,)``; returns a long tensor ``(B,)``. Networks that embed a
    discrete noise index use this to follow the ``net(x, sigma)`` convention.
    """
    distance = (sigma.log()[:, None] - sigmas.to(sigma).log()[None, :]).abs()
    return distance.argmin(dim=1)
