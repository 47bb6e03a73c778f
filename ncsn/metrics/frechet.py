"""The Frechet distance between Gaussians, streaming feature statistics, and their files.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule ...", eq. 6) is the
Frechet (2-Wasserstein) distance between Gaussians fitted to Inception features:

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr( (S_1 S_2)^{1/2} ).

Statistics files use the format of the published TTUR / pytorch-fid ``.npz`` files: an
uncompressed NumPy archive with the arrays ``mu`` (D,) and ``sigma`` (D, D).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def _clamp(w: np.ndarray) -> np.ndarray:
    """Eigenvalues (D,) of a symmetric PSD matrix with round-off set to zero.

    Eigenvalues below D * eps * max|lambda| are indistinguishable from zero (the rank
    threshold of ``np.linalg.matrix_rank``) and are set to zero: their square roots would
    otherwise add sqrt(round-off) terms, which matters for rank-deficient covariances
    (fewer samples than feature dimensions).
    """
    tol = len(w) * np.finfo(np.float64).eps * np.abs(w).max(initial=0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (D, D)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_clamp(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr( (S_1 S_2)^{1/2} ) for symmetric PSD S_1, S_2 (D, D).

    With R = S_1^{1/2}, S_1 S_2 = R (R S_2) has the eigenvalues of (R S_2) R = R S_2 R
    (AB and BA share them), a symmetric PSD matrix, so tr (S_1 S_2)^{1/2} = sum_i
    sqrt(lambda_i(R S_2 R)). Working with the symmetric matrix avoids the complex round-off
    of a general matrix square root, and singular S_1 (fewer samples than dimensions) is fine.
    """
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    return float(np.sqrt(_clamp(np.linalg.eigvalsh((m + m.T) / 2))).sum())


def frechet_distance(mu1: np.ndarray | Tensor, sigma1: np.ndarray | Tensor,
                     mu2: np.ndarray | Tensor, sigma2: np.ndarray | Tensor) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    mu: (D,), sigma: (D, D) symmetric PSD (NumPy arrays or tensors). This is the number
    reported as "FID" when the statistics are those of Inception pool features.
    """
    mu1, mu2 = _as_f64(mu1), _as_f64(mu2)
    sigma1, sigma2 = _as_f64(sigma1), _as_f64(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics disagree: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _as_f64(a: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


@dataclass
class FeatureStats:
    """Running mean and covariance of feature vectors, accumulated in float64 batch by batch.

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979), so only
    the (D,) mean and the (D, D) sum of centred outer products are held, never the features:

        n = n_a + n_b,  delta = mean_b - mean_a,
        mean = mean_a + delta n_b / n,  M2 = M2_a + M2_b + delta delta^T n_a n_b / n.

    ``sigma`` divides by n - 1, as ``np.cov`` does (the convention of the published stats).
    """

    n: int = 0
    _mean: Tensor | None = field(default=None, repr=False)          # (D,) float64
    _m2: Tensor | None = field(default=None, repr=False)            # (D, D) float64

    def update(self, feats: Tensor) -> "FeatureStats":
        """Add a batch of features (B, D); returns self."""
        feats = feats.detach().reshape(feats.shape[0], -1).double()
        nb = feats.shape[0]
        if nb == 0:
            return self
        mean_b = feats.mean(0)
        centred = feats - mean_b
        m2_b = centred.T @ centred
        if self._mean is None:
            self.n, self._mean, self._m2 = nb, mean_b, m2_b
            return self
        n = self.n + nb
        delta = mean_b.to(self._mean.device) - self._mean
        self._mean = self._mean + delta * (nb / n)
        correction = torch.outer(delta, delta) * (self.n * nb / n)
        self._m2 = self._m2 + m2_b.to(self._m2.device) + correction
        self.n = n
        return self

    @property
    def mu(self) -> np.ndarray:
        """Mean, (D,) float64."""
        self._check(1)
        return self._mean.cpu().numpy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance, (D, D) float64."""
        self._check(2)
        return (self._m2 / (self.n - 1)).cpu().numpy()

    def _check(self, need: int) -> None:
        if self.n < need:
            raise ValueError(f"FeatureStats holds {self.n} feature vectors, need at least {need}")

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu`` and ``sigma`` to an ``.npz`` file in the published format."""
        save_stats(path, self.mu, self.sigma)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write statistics as the TTUR / pytorch-fid ``.npz``: arrays ``mu`` (D,), ``sigma`` (D, D)."""
    np.savez(path, mu=np.asarray(mu), sigma=np.asarray(sigma))


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``mu`` (D,) and ``sigma`` (D, D) as float64 from a published-format ``.npz`` file."""
    with np.load(path) as f:
        missing = {"mu", "sigma"} - set(f.files)
        if missing:
            raise KeyError(f"{path} has arrays {sorted(f.files)}; a statistics file needs "
                           f"'mu' and 'sigma'")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
