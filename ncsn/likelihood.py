"""Exact log-likelihoods of a score network through the probability-flow ODE.

The variance-exploding SDE has marginals p_sigma = p_data * N(0, sigma^2 I), and its
probability-flow ODE (score SDE, Song et al. 2021, Sec. 4.3) moves a point through those
marginals:

    dx/dsigma = -sigma s(x, sigma),            s(x, sigma) ~ grad_x log p_sigma(x).

By the instantaneous change of variables (score SDE, Appendix D.2, eq. 39 with the drift
f~ = dx/dsigma), along a solution of the ODE

    d log p_sigma(x(sigma)) / dsigma = -div f~ = sigma div_x s(x, sigma),

so, integrating from sigma_min (the data end) to sigma_max (the prior end),

    log p_sigma_min(x) = log p_sigma_max(x(sigma_max))
                         - int_{sigma_min}^{sigma_max} sigma div_x s(x(sigma), sigma) dsigma,

with p_sigma_max taken to be the prior N(0, sigma_max^2 I). The divergence is the
Skilling-Hutchinson estimate E_eps[eps^T (d s / d x) eps] (Gaussian or Rademacher eps,
drawn once per solve as score SDE does, so the ODE stays smooth for the adaptive solver), or
exact (d backward passes) for small d. The ODE is solved by scipy's RK45 (``solve_ivp``).

For images, :func:`bits_per_dim` turns the model-space density into bits per dimension of
the discrete data (uniform dequantization and the model-space map counted).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ncsn.data.images import ModelSpace

ScoreNet = Callable[[Tensor, Tensor], Tensor]
PROBES = ("rademacher", "gaussian")


class LogLikelihood(NamedTuple):
    log_p: Tensor          # (B,) float64: log p_sigma_min(x) in nats, per sample
    nfe: int               # network evaluations (right-hand sides of the ODE) of the solve


def draw_probes(n_probes: int, x: Tensor, probe: str = "rademacher",
                generator: torch.Generator | None = None) -> Tensor:
    """``n_probes`` vectors eps with E[eps eps^T] = I, shaped like ``x``:
    ``(n_probes, B, ...)``. Rademacher: +-1 with equal odds; gaussian: N(0, I)."""
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1, got {n_probes}")
    size = (n_probes, *x.shape)
    if probe == "gaussian":
        eps = torch.randn(size, generator=generator, dtype=x.dtype)
    else:
        eps = torch.randint(0, 2, size, generator=generator).to(x.dtype) * 2 - 1
    return eps.to(x.device)


def hutchinson_divergence(score: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Skilling-Hutchinson estimate of div_x s: the mean over probes of eps^T (ds/dx) eps,
    one vector-Jacobian product per probe. ``score`` (B, ...) computed from ``x`` (B, ...)
    with grad enabled, ``probes`` (P, B, ...); the network must treat samples independently
    (eval mode). Returns (B,)."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i, eps in enumerate(probes):
        (eps_jac,) = torch.autograd.grad(score, x, eps, retain_graph=i < len(probes) - 1)
        total = total + (eps_jac * eps).flatten(1).sum(1)
    return total / len(probes)


def exact_divergence(score: Tensor, x: Tensor) -> Tensor:
    """div_x s = sum_j d s_j / d x_j exactly, one backward pass per dimension (small d only).
    ``score`` (B, ...) computed from ``x`` (B, ...) with grad enabled. Returns (B,)."""
    flat = score.flatten(1)                                         # (B, d)
    d = flat.shape[1]
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for j in range(d):
        (grad,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=j < d - 1)
        div = div + grad.flatten(1)[:, j]
    return div


def gaussian_prior_log_prob(x: Tensor, sigma_max: float) -> Tensor:
    """log N(x; 0, sigma_max^2 I) per sample: -d/2 log(2 pi sigma_max^2) - |x|^2 / (2 sigma_max^2).
    ``x`` (B, ...) -> (B,)."""
    d = x[0].numel()
    return (-0.5 * d * math.log(2 * math.pi * sigma_max ** 2)
            - x.flatten(1).pow(2).sum(1) / (2 * sigma_max ** 2))


def log_likelihood(net: ScoreNet, x: Tensor, sigma_min: float, sigma_max: float,
                   rtol: float = 1e-5, atol: float = 1e-5, n_probes: int = 1,
                   probe: str = "rademacher", exact_divergence: bool = False,
                   generator: torch.Generator | None = None,
                   prior_log_prob: Callable[[Tensor], Tensor] | None = None) -> LogLikelihood:
    """log p_sigma_min(x) through the probability-flow ODE, in nats per sample.

    ``net(x, sigma)``: the score network (sigma of shape (B,)), in eval mode; ``x``: (B, ...)
    points in the model's space. The ODE and the log-density change

        dx/dsigma = -sigma s(x, sigma),    d log p / dsigma = sigma div_x s(x, sigma)

    are solved together from sigma_min to sigma_max by RK45 with ``rtol`` / ``atol``, in the
    variable u = log sigma (dx/du = -sigma^2 s, d log p / du = sigma^2 div s: the same
    integral, with steps that grow with sigma). Then log p_sigma_min(x) = log prior(x(sigma_max))
    - int sigma div s dsigma (score SDE, Appendix D.2). The divergence: the Hutchinson
    estimate with ``n_probes`` ``probe`` vectors drawn once (from ``generator``), or exact
    with ``exact_divergence=True`` (d backward passes per evaluation; small d). The prior:
    N(0, sigma_max^2 I), or ``prior_log_prob(x) -> (B,)``. The whole batch is one ODE system
    (the step size follows its hardest sample). Returns ``LogLikelihood(log_p (B,), nfe)``.
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    shape, n = x.shape, x.numel()
    probes = None if exact_divergence else draw_probes(n_probes, x, probe, generator)

    def rhs(u: float, state: np.ndarray) -> np.ndarray:
        sigma = math.exp(u)
        y = torch.from_numpy(state[:n]).reshape(shape).to(x.device, x.dtype)
        with torch.enable_grad():
            y.requires_grad_(True)
            score = net(y, torch.full((shape[0],), sigma, device=x.device, dtype=x.dtype))
            div = _divergence(score, y, probes)
        dx = -sigma ** 2 * score.detach()                           # dx/du = -sigma^2 s
        d_delta = sigma ** 2 * div                                  # sigma^2 div s
        return np.concatenate([dx.double().cpu().flatten().numpy(),
                               d_delta.double().cpu().numpy()])

    start = np.concatenate([x.detach().double().cpu().flatten().numpy(), np.zeros(shape[0])])
    from scipy.integrate import solve_ivp     # here: scipy is slow to import

    solution = solve_ivp(rhs, (math.log(sigma_min), math.log(sigma_max)), start,
                         method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"the probability-flow ODE solve failed: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1])
    x_end, delta = end[:n].reshape(shape), end[n:]
    prior = prior_log_prob(x_end) if prior_log_prob is not None else \
        gaussian_prior_log_prob(x_end, sigma_max)
    return LogLikelihood(prior.double().cpu() - delta, int(solution.nfev))


def _divergence(score: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    return exact_divergence(score, x) if probes is None else \
        hutchinson_divergence(score, x, probes)


def model_space_log_det(z: Tensor, space: ModelSpace) -> Tensor:
    """log |det dz/dy| of the map y in [0, 1]^d -> model space z, per sample, from z (B, ...):
    identity 0; rescaled (z = 2y - 1) d log 2; logit transform (z = logit(p),
    p = lam + (1 - 2 lam) y) sum_i [log(1 - 2 lam) - log p_i - log(1 - p_i)], p_i = sigmoid(z_i).
    Returns (B,) float64."""
    z = z.double().flatten(1)
    if space.logit:
        per_pixel = (math.log(1 - 2 * space.lam) - torch.nn.functional.logsigmoid(z)
                     - torch.nn.functional.logsigmoid(-z))
        return per_pixel.sum(1)
    d = z.shape[1]
    return torch.full((z.shape[0],), d * math.log(2) if space.rescaled else 0.0,
                      dtype=torch.float64)


def bits_per_dim(log_p: Tensor, z: Tensor, space: ModelSpace = ModelSpace(),
                 levels: int | None = 256) -> Tensor:
    """Bits per dimension of discrete data from a model-space log-density, per sample.

    The data x take ``levels`` = K values per dimension; uniform dequantization
    y = (x (K - 1) + u) / K, u ~ U(0, 1)^d, puts each x in a cell of volume K^-d of
    [0, 1]^d, so log P(x) >= E_u[log p_Y(y)] - d log K (Theis et al. 2016). The model sees
    z = f(y) (``space``: identity, 2y - 1, or the logit transform) and gives log p_Z(z)
    (``log_p``), so log p_Y(y) = log p_Z(z) + log |det dz/dy|, and

        bits/dim = -(log p_Z(z) + log |det dz/dy| - d log K) / (d log 2).

    With the rescaled map this is -log p_Z / (d log 2) - 1 + log2 K (score SDE's "7" for
    8-bit images in [-1, 1]; 8 for [0, 1]). ``levels=None``: continuous data, no offset.
    ``log_p`` (B,) nats, ``z`` (B, ...) the dequantized points in model space. Returns (B,)
    float64 on ``log_p``'s device, differentiable in ``log_p`` (flows train on it).
    """
    d = z[0].numel()
    log_cell = d * math.log(levels) if levels is not None else 0.0
    log_p = log_p.double()
    log_det = model_space_log_det(z.detach(), space).to(log_p)
    return -(log_p + log_det - log_cell) / (d * math.log(2))
