"""Distances between point clouds, and score errors against an analytic score.

For the 2-D toy experiments: compare samples with data (sliced Wasserstein, energy
distance) and compare a trained score network with the exact score of a Gaussian mixture
at every noise level (the ground truth of the NCSN paper's Figure 3).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from ncsn.data.toy import GaussianMixture

ScoreNet = Callable[[Tensor, Tensor], Tensor]


def _random_directions(d: int, n_projections: int, seed: int) -> Tensor:
    """(n_projections, d) float64 unit vectors, uniform on the sphere (normalised Gaussians)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n_projections, d, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def _wasserstein_1d(u: Tensor, v: Tensor, p: int) -> Tensor:
    """W_p^p between the empirical measures of each column of u (N, P) and v (M, P).

    In 1-D, W_p^p = int_0^1 |F_u^{-1}(t) - F_v^{-1}(t)|^p dt. Both quantile functions are
    step functions with steps at i/N and j/M, so the integral is exact over the merged grid;
    for N == M it is mean_i |u_(i) - v_(i)|^p over the sorted values. Returns (P,).
    """
    n, m = u.shape[0], v.shape[0]
    u, v = u.sort(dim=0).values, v.sort(dim=0).values
    t = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                   torch.arange(1, m + 1, dtype=torch.float64) / m]).unique()   # right ends
    widths = torch.diff(t, prepend=t.new_zeros(1))                              # (T,)
    mid = t - widths / 2
    iu = (mid * n).long().clamp(max=n - 1).to(u.device)
    iv = (mid * m).long().clamp(max=m - 1).to(v.device)
    return ((u[iu] - v[iv]).abs().pow(p) * widths.to(u.device)[:, None]).sum(0)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0,
                       p: int = 1) -> float:
    """Sliced Wasserstein distance SW_p between two point clouds (Bonneel et al. 2015).

    SW_p(x, y) = ( E_theta W_p^p(theta^T x, theta^T y) )^{1/p}, theta uniform on the unit
    sphere, estimated with ``n_projections`` seeded directions. The default p = 1 is the
    mean over directions of the 1-D W1 distance, i.e. for equal sizes the mean absolute
    difference of the sorted projections. x: (N, d), y: (M, d), N and M may differ (the
    1-D distances are computed exactly from the empirical quantile functions).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need x (N, d) and y (M, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    theta = _random_directions(x.shape[1], n_projections, seed).to(x.device)    # (P, d)
    wp = _wasserstein_1d(x.double() @ theta.T, y.double().to(x.device) @ theta.T, p)
    return float(wp.mean() ** (1.0 / p))


def _mean_pairwise_distance(a: Tensor, b: Tensor, exclude_diagonal: bool,
                            chunk: int = 1024) -> float:
    """Mean Euclidean distance |a_i - b_j| over all pairs, rows of a taken ``chunk`` at a time.

    a: (N, d), b: (M, d). With ``exclude_diagonal`` (a is b) the N zero self-distances are
    left out and the sum divided by N (N - 1): the unbiased U-statistic.
    """
    total = 0.0
    for start in range(0, a.shape[0], chunk):
        total += torch.cdist(a[start:start + chunk], b).sum().item()
    n, m = a.shape[0], b.shape[0]
    return total / (n * (n - 1) if exclude_diagonal else n * m)


def energy_distance(x: Tensor, y: Tensor, chunk: int = 1024) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo 2013, eq. 2).

    x: (N, d), y: (M, d), both with at least two points. The within-sample terms are the
    unbiased U-statistics (pairs i != j), so for two draws of the same distribution the
    estimate is centred on zero and may come out slightly negative. Distances are computed
    in float64, ``chunk`` rows at a time (10k points need ~80 MB per chunk).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need x (N, d) and y (M, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[0], y.shape[0]) < 2:
        raise ValueError("energy distance needs at least two points in each set")
    x, y = x.double(), y.double().to(x.device)
    xy = _mean_pairwise_distance(x, y, exclude_diagonal=False, chunk=chunk)
    xx = _mean_pairwise_distance(x, x, exclude_diagonal=True, chunk=chunk)
    yy = _mean_pairwise_distance(y, y, exclude_diagonal=True, chunk=chunk)
    return 2 * xy - xx - yy


def _net_device(net: ScoreNet) -> torch.device:
    """The device of the network's first parameter; CPU for plain functions."""
    params = getattr(net, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def score_error(net: ScoreNet, mixture: GaussianMixture, sigmas: Sequence[float] | Tensor,
                n: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """Error of a score network against the exact score of the sigma-perturbed mixture.

    For each sigma, draws n points x~ from q_sigma, the mixture convolved with
    N(0, sigma^2 I) (seeded), and compares net(x~, sigma) with grad log q_sigma(x~)
    (``mixture.score``):

        mse      = E || s_theta(x~, sigma) - grad log q_sigma(x~) ||^2   (the Fisher divergence)
        relative = mse / E || grad log q_sigma(x~) ||^2

    ``relative`` is scale-free (a zero network scores 1 at every sigma). ``net`` is called as
    net(x, sigma) with x (n, d) float32 and sigma (n,), in eval mode (its mode is restored).
    Returns {"sigma": [...], "mse": [...], "relative": [...]}, one entry per noise level.
    """
    was_training = getattr(net, "training", False)
    if isinstance(net, torch.nn.Module):
        net.eval()
    try:
        return _score_error(net, mixture, sigmas, n, seed)
    finally:
        if isinstance(net, torch.nn.Module):
            net.train(was_training)


def _score_error(net: ScoreNet, mixture: GaussianMixture, sigmas: Sequence[float] | Tensor,
                 n: int, seed: int) -> dict[str, list[float]]:
    device = _net_device(net)
    sigma_list = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
    out: dict[str, list[float]] = {"sigma": sigma_list, "mse": [], "relative": []}
    for i, sigma in enumerate(sigma_list):
        # p convolved with N(0, sigma^2 I) is the same mixture with variance std^2 + sigma^2
        perturbed = replace(mixture, std=(mixture.std ** 2 + sigma ** 2) ** 0.5)
        x_tilde = perturbed.sample(n, seed=seed + i)                            # (n, d)
        target = mixture.score(x_tilde.double(), sigma)                          # (n, d) float64
        sigma_b = torch.full((n,), sigma, device=device)
        pred = net(x_tilde.to(device), sigma_b).double().cpu()
        mse = (pred - target).pow(2).sum(1).mean().item()
        out["mse"].append(mse)
        out["relative"].append(mse / target.pow(2).sum(1).mean().item())
    return out
