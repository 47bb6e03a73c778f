"""Two-dimensional toy distributions.

Each sampler takes ``n`` and a ``seed`` and returns a float32 tensor of shape ``(n, 2)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def swiss_roll(n: int, seed: int = 0, noise: float = 1.0) -> Tensor:
    """scikit-learn's Swiss roll, columns 0 and 2, divided by 10."""
    from sklearn.datasets import make_swiss_roll     # here: scikit-learn takes a second to import

    x, _ = make_swiss_roll(n, noise=noise, random_state=seed)
    return torch.from_numpy(x[:, [0, 2]] / 10.0).float()


def moons(n: int, seed: int = 0, noise: float = 0.05) -> Tensor:
    """scikit-learn's two interleaving half circles."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=noise, random_state=seed)
    return torch.from_numpy(x).float()


def eight_gaussians(n: int, seed: int = 0, radius: float = 2.0, std: float = 0.1) -> Tensor:
    """Eight equally weighted Gaussians on a circle of the given radius."""
    rng = np.random.default_rng(seed)
    angles = 2 * math.pi * rng.integers(0, 8, size=n) / 8
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return torch.from_numpy(centres + std * rng.standard_normal((n, 2))).float()


def checkerboard(n: int, seed: int = 0, size: float = 4.0) -> Tensor:
    """Uniform density on the dark squares of a 4x4 checkerboard spanning [-size/2, size/2]^2."""
    rng = np.random.default_rng(seed)
    cell = size / 4
    col = rng.integers(0, 4, size=n)
    row = 2 * rng.integers(0, 2, size=n) + (col % 2)              # dark squares only
    x = (col + rng.random(n)) * cell - size / 2
    y = (row + rng.random(n)) * cell - size / 2
    return torch.from_numpy(np.stack([x, y], axis=1)).float()


@dataclass
class GaussianMixture:
    """An isotropic Gaussian mixture sum_k w_k N(mu_k, std^2 I), with its exact score.

    Perturbing it with N(0, sigma^2 I) gives another mixture with variance std^2 + sigma^2,
    so the score of every noise level is known in closed form (the ground truth the
    NCSN paper's Figure 3 uses).
    """

    means: Tensor                                                   # (K, d)
    weights: Tensor                                                 # (K,)
    std: float = 1.0

    @classmethod
    def create(cls, means: Sequence[Sequence[float]], weights: Sequence[float],
               std: float = 1.0) -> "GaussianMixture":
        weights_t = torch.as_tensor(weights, dtype=torch.float64)
        if len(weights_t) != len(means) or (weights_t < 0).any() or weights_t.sum() <= 0:
            raise ValueError(f"need one non-negative weight per mean, got means={means}, "
                             f"weights={weights}")
        return cls(torch.as_tensor(means, dtype=torch.float64), weights_t / weights_t.sum(), std)

    def sample(self, n: int, seed: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        noise = torch.randn(n, self.means.shape[1], generator=g, dtype=torch.float64)
        return (self.means[k] + self.std * noise).float()

    def _log_components(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        x = x.double()
        var = self.std ** 2 + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        diff = x[:, None, :] - self.means[None].to(x.device)         # (B, K, d)
        d = x.shape[1]
        log_norm = -0.5 * d * torch.log(2 * math.pi * var)         # (B or 1, 1)
        log_comp = self.weights.to(x.device).log() + log_norm - 0.5 * diff.pow(2).sum(-1) / var
        return log_comp, diff / var[..., None]

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log q_sigma(x) for x of shape (B, d); sigma a float or a (B,) tensor."""
        log_comp, _ = self._log_components(x, sigma)
        return torch.logsumexp(log_comp, dim=1)

    def score(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """grad_x log q_sigma(x): the posterior-weighted sum of -(x - mu_k) / (std^2 + sigma^2)."""
        log_comp, scaled_diff = self._log_components(x, sigma)
        posterior = torch.softmax(log_comp, dim=1)                   # (B, K)
        return -(posterior[..., None] * scaled_diff).sum(1).to(x.dtype)


def gaussian_mixture(n: int, seed: int = 0,
                     means: Sequence[Sequence[float]] = ((-5.0, -5.0), (5.0, 5.0)),
                     weights: Sequence[float] = (0.2, 0.8), std: float = 1.0) -> Tensor:
    """Default: the NCSN paper's Figure 3 mixture, 1/5 N((-5,-5), I) + 4/5 N((5,5), I)."""
    return GaussianMixture.create(means, weights, std).sample(n, seed)


TOY_DATASETS = {
    "swiss_roll": swiss_roll,
    "moons": moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "gaussian_mixture": gaussian_mixture,
}


def make_toy(name: str, n: int, seed: int = 0, **params) -> Tensor:
    """Draw ``n`` points of the named 2-D distribution; ``params`` are its options."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {sorted(TOY_DATASETS)}")
    return TOY_DATASETS[name](n, seed=seed, **params)
