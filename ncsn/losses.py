"""Score-matching objectives.

Every objective takes a score function and a batch ``x`` of shape ``(B, ...)`` and returns
the mean over the batch of a per-sample value that sums over data dimensions
(``reduction="none"`` returns the per-sample values, shape ``(B,)``).

A score function is any callable ``score_fn(x) -> s`` with ``s.shape == x.shape``; a
noise-conditional network is called as ``net(x, sigma)`` with ``sigma`` of shape ``(B,)``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- random draws
# Every random number an objective uses comes from `_randn` or `_randint`. Inside
# `batch_shard`, they draw for the whole global batch and keep this process's rows, so that
# data-parallel ranks, each holding rows start:stop of the global batch, see exactly the
# labels and noise one process would draw for those rows, and the global RNG advances alike
# on every rank.
_SHARD: ContextVar[tuple[int, int, int] | None] = ContextVar("ncsn_batch_shard", default=None)


@contextmanager
def batch_shard(rows: slice, global_batch: int):
    """Objectives called inside see rows ``rows`` of a global batch of ``global_batch``."""
    token = _SHARD.set((rows.start, rows.stop, global_batch))
    try:
        yield
    finally:
        _SHARD.reset(token)


def batch_rows(n: int) -> tuple[int, slice]:
    """The global batch and this process's rows of it, for a batch of ``n`` here:
    ``(n, slice(0, n))`` outside a batch shard."""
    shard = _SHARD.get()
    if shard is None:
        return n, slice(0, n)
    start, stop, global_batch = shard
    if n != stop - start:
        raise ValueError(f"a batch of {n} inside a shard of {stop - start} rows")
    return global_batch, slice(start, stop)


def _global_draw(draw: Callable[[tuple[int, ...]], Tensor], shape: tuple[int, ...]) -> Tensor:
    """``draw(shape)``, or, inside a batch shard, this shard's rows of the global draw."""
    shard = _SHARD.get()
    if shard is None:
        return draw(shape)
    start, stop, global_batch = shard
    if shape[0] != stop - start:
        raise ValueError(f"a batch of {shape[0]} inside a shard of {stop - start} rows")
    return draw((global_batch, *shape[1:]))[start:stop]


def _randn(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Standard normals of ``shape`` (batch first), on ``like``'s device and dtype."""
    return _global_draw(lambda s: torch.randn(s, device=like.device, dtype=like.dtype), shape)


def _randint(high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Integers uniform on {0, ..., high - 1} of ``shape`` (batch first)."""
    return _global_draw(lambda s: torch.randint(0, high, s, device=device), shape)


def draw_labels(n: int, n_levels: int, device: torch.device) -> Tensor:
    """One noise level per sample, uniform over the table: indices of shape ``(n,)``."""
    return _randint(n_levels, (n,), device)


SIGMA_DISTRIBUTIONS = ("log_uniform", "log_normal")


def draw_sigmas(n: int, sigma_begin: float, sigma_end: float, distribution: str = "log_uniform",
                P_mean: float = -1.2, P_std: float = 1.2, like: Tensor | None = None) -> Tensor:
    """Continuous noise levels, one per sample, in [sigma_end, sigma_begin]: shape ``(n,)``.

    ``log_uniform``: log sigma uniform (score SDE's VE training: sigma_min (sigma_max /
    sigma_min)^t, t ~ U(0, 1)). ``log_normal``: EDM's log sigma ~ N(P_mean, P_std^2),
    truncated to the range (drawn by the inverse CDF from a uniform on [Phi(a), Phi(b)], so
    there are no atoms at the ends, as clamping would make). ``like``: device and dtype.
    """
    if distribution not in SIGMA_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {', '.join(SIGMA_DISTRIBUTIONS)}, "
                         f"got {distribution!r}")
    like = like if like is not None else torch.empty(0)
    u = _global_draw(lambda s: torch.rand(s, device=like.device, dtype=torch.float64), (n,))
    low, high = math.log(sigma_end), math.log(sigma_begin)
    if distribution == "log_uniform":
        log_sigma = low + (high - low) * u
    else:
        phi = lambda t: 0.5 * (1 + math.erf((t - P_mean) / (P_std * math.sqrt(2))))
        u = phi(low) + (phi(high) - phi(low)) * u
        log_sigma = (P_mean + P_std * torch.special.ndtri(u)).clamp(low, high)
    return log_sigma.exp().to(like.dtype)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _flat_dim(x: Tensor) -> int:
    return x[0].numel()


def score_matching(score_fn: ScoreFn, x: Tensor, max_dim: int = 1024,
                   reduction: str = "mean") -> Tensor:
    """Exact score matching (Hyvarinen 2005, eq. 4): E[ tr(grad_x s(x)) + 1/2 ||s(x)||^2 ].

    The trace needs one backward pass per data dimension, so the cost grows with d; above
    ``max_dim`` dimensions this refuses instead of running for hours.
    """
    d = _flat_dim(x)
    if d > max_dim:
        raise ValueError(
            f"exact score matching needs {d} backward passes per step for {d}-dimensional "
            f"data (loss.max_dim={max_dim}); use loss=ssm, loss=ssm_vr or loss=anneal_dsm, "
            f"or raise loss.max_dim if you really mean it")
    x = x.detach().requires_grad_(True)
    s = score_fn(x).flatten(1)                                   # (B, d)
    trace = torch.zeros(x.shape[0], device=x.device, dtype=s.dtype)
    for i in range(d):
        # d/dx_i of s_i for every sample at once: samples do not interact in the network.
        grad_i = torch.autograd.grad(s[:, i].sum(), x, create_graph=True)[0].flatten(1)
        trace = trace + grad_i[:, i]
    per_sample = trace + 0.5 * s.pow(2).sum(dim=1)
    return _reduce(per_sample, reduction)


def _projections(shape: tuple[int, ...], kind: str, like: Tensor) -> Tensor:
    """Random projection vectors v with E[v v^T] = I (not normalised to the sphere)."""
    if kind == "gaussian":
        return _randn(shape, like)
    if kind == "rademacher":
        return _randint(2, shape, like.device).to(like.dtype) * 2 - 1
    raise ValueError(f"projection must be 'gaussian' or 'rademacher', got {kind!r}")


def sliced_score_matching(score_fn: ScoreFn, x: Tensor, n_projections: int = 1,
                          projection: str = "gaussian", variance_reduction: bool = False,
                          reduction: str = "mean") -> Tensor:
    """Sliced score matching (Song, Garg, Shi & Ermon 2019, eq. 7):
    E_v E_x[ v^T (grad_x s) v + 1/2 (v^T s)^2 ], with E[v v^T] = I.

    With ``variance_reduction=True`` (SSM-VR, eq. 8) the second term is 1/2 ||s||^2, its
    expectation over v. Each projection costs one vector-Jacobian product.
    """
    x = x.detach().requires_grad_(True)
    s = score_fn(x)                                              # (B, ...)
    per_sample = torch.zeros(x.shape[0], device=x.device, dtype=s.dtype)
    for _ in range(n_projections):
        v = _projections(tuple(x.shape), projection, s)
        v_dot_s = (v * s).flatten(1).sum(dim=1)                  # (B,)
        # (v^T grad_x s) by one vector-Jacobian product, then dotted with v again.
        vjp = torch.autograd.grad(v_dot_s.sum(), x, create_graph=True)[0]
        per_sample = per_sample + (vjp * v).flatten(1).sum(dim=1)
        if not variance_reduction:
            per_sample = per_sample + 0.5 * v_dot_s.pow(2)
    per_sample = per_sample / n_projections
    if variance_reduction:
        per_sample = per_sample + 0.5 * s.flatten(1).pow(2).sum(dim=1)
    return _reduce(per_sample, reduction)


def denoising_score_matching(score_fn: ScoreFn, x: Tensor, sigma: float | Tensor,
                             reduction: str = "mean") -> Tensor:
    """Denoising score matching (Vincent 2011): with x_tilde = x + sigma z, z ~ N(0, I),
    1/2 E|| s(x_tilde) + (x_tilde - x) / sigma^2 ||^2.

    ``sigma`` is a float or a tensor broadcastable to ``x`` (one value per sample).
    """
    x_tilde = x + sigma * _randn(tuple(x.shape), x)
    target = -(x_tilde - x) / sigma ** 2                          # grad log q_sigma(x_tilde | x)
    per_sample = 0.5 * (score_fn(x_tilde) - target).flatten(1).pow(2).sum(dim=1)
    return _reduce(per_sample, reduction)


def _draw_labels(x: Tensor, sigmas: Tensor, labels: Tensor | None) -> Tensor:
    return labels if labels is not None else draw_labels(x.shape[0], len(sigmas), x.device)


def _per_sample_sigma(x: Tensor, sigmas: Tensor, labels: Tensor) -> Tensor:
    return sigmas.to(x.device, x.dtype)[labels]                   # (B,)


def _broadcast(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.view(-1, *([1] * (x.dim() - 1)))                 # (B, 1, ..., 1)


def _sample_sigma(x: Tensor, sigmas: Tensor, labels: Tensor | None,
                  sigma: Tensor | None) -> Tensor:
    if sigma is not None:
        return sigma.to(x.device, x.dtype)
    return _per_sample_sigma(x, sigmas, _draw_labels(x, sigmas, labels))


def anneal_dsm(net: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor,
               anneal_power: float = 2.0, labels: Tensor | None = None,
               reduction: str = "mean", sigma: Tensor | None = None) -> Tensor:
    """Annealed denoising score matching (NCSN, eq. 5-6):
    (1/L) sum_i lambda(sigma_i) l(sigma_i) with lambda(sigma) = sigma^anneal_power.

    Each sample's sigma is drawn uniformly from the table (or given by ``labels``, indices
    into ``sigmas``, or by ``sigma``, values ``(B,)``, for continuous noise levels); the
    network is called as ``net(x_tilde, sigma)``.
    """
    sigma = _sample_sigma(x, sigmas, labels, sigma)
    sigma_b = _broadcast(sigma, x)
    per_sample = denoising_score_matching(lambda y: net(y, sigma), x, sigma_b, reduction="none")
    return _reduce(per_sample * sigma ** anneal_power, reduction)


def annealed(objective: Callable[..., Tensor], net: Callable[[Tensor, Tensor], Tensor],
             x: Tensor, sigmas: Tensor, anneal_power: float = 2.0,
             labels: Tensor | None = None, reduction: str = "mean",
             sigma: Tensor | None = None, **kwargs) -> Tensor:
    """Any score-matching objective, annealed over a sigma table with a noise-conditional
    network, as the original NCSN did with sliced score matching: perturb each sample with
    its own sigma, match the score of the perturbed data q_sigma with ``net(., sigma)``,
    and weight by sigma^anneal_power.

    ``objective`` is :func:`score_matching` or :func:`sliced_score_matching`; ``kwargs``
    go to it. ``labels`` or ``sigma`` as in :func:`anneal_dsm`.
    """
    sigma = _sample_sigma(x, sigmas, labels, sigma)
    x_tilde = x + _broadcast(sigma, x) * _randn(tuple(x.shape), x)
    per_sample = objective(lambda y: net(y, sigma), x_tilde, reduction="none", **kwargs)
    return _reduce(per_sample * sigma ** anneal_power, reduction)


# ----------------------------------------------------------------------------- EDM
# NVlabs/edm's training losses (training/loss.py) for a denoiser D(x; sigma). Each draws
# sigma per sample, then the noise, in that order and with the same calls as EDM's code
# (torch.randn / torch.rand of the batch, then randn of the batch's shape), so that one
# process seeded alike draws EDM's numbers; inside `batch_shard` each rank keeps its rows.
def edm_sigmas(n: int, P_mean: float = -1.2, P_std: float = 1.2,
               like: Tensor | None = None) -> Tensor:
    """EDMLoss's noise levels: ln sigma ~ N(P_mean, P_std^2), not truncated (EDM, Sec. 5 and
    Table 1, "Ours"): shape ``(n,)``. ``like``: device and dtype."""
    like = like if like is not None else torch.empty(0)
    return (_randn((n,), like) * P_std + P_mean).exp()


def ve_sigmas(n: int, sigma_min: float = 0.02, sigma_max: float = 100.0,
              like: Tensor | None = None) -> Tensor:
    """VELoss's noise levels: sigma_min (sigma_max / sigma_min)^u, u ~ U(0, 1) (score SDE's VE
    training, log sigma uniform): shape ``(n,)``."""
    like = like if like is not None else torch.empty(0)
    u = _global_draw(lambda s: torch.rand(s, device=like.device, dtype=like.dtype), (n,))
    return sigma_min * (sigma_max / sigma_min) ** u


def edm_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    (Table 1, "Ours"), which is 1 / c_out(sigma)^2 of its preconditioning."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def ve_weight(sigma: Tensor) -> Tensor:
    """VELoss's lambda(sigma) = 1 / sigma^2 (Table 1, "VE")."""
    return 1 / sigma ** 2


def augment_keywords(augment_labels: Tensor | None) -> dict:
    """The keyword that passes augmentation labels to a network: none without them, so that
    every network, with or without the option, is still called as ``net(x, sigma)``."""
    return {} if augment_labels is None else {"augment_labels": augment_labels}


def tweedie_denoiser(net: Callable[..., Tensor], augment_labels: Tensor | None = None
                     ) -> Callable[[Tensor, Tensor], Tensor]:
    """The denoiser of a score network, D(x; sigma) = x + sigma^2 s(x, sigma) (EDM, eq. 3).
    For a preconditioned network (:mod:`ncsn.nets.precond`), whose score is
    (D - x) / sigma^2, this is its D up to float32 round-off; it calls ``net(x, sigma)``
    itself, so that DistributedDataParallel's forward (and its gradient averaging) runs.
    ``augment_labels`` ``(B, augment_dim)``: EDM's augmentation labels of the batch
    (:mod:`ncsn.augment`), passed as ``net(x, sigma, augment_labels=...)``."""
    keywords = augment_keywords(augment_labels)
    return lambda x, sigma: x + _broadcast(sigma, x) ** 2 * net(x, sigma, **keywords)


def denoiser_loss(denoise: Callable[[Tensor, Tensor], Tensor], y: Tensor, sigma: Tensor,
                  weight: Tensor, noise: Tensor | None = None,
                  reduction: str = "mean") -> Tensor:
    """EDM's training loss (eq. 2 and 8): lambda(sigma) ||D(y + n; sigma) - y||^2 with
    n = sigma eps, eps ~ N(0, I) (or ``noise``, eps given, of ``y``'s shape).

    ``denoise(x, sigma)`` is D; ``sigma`` and ``weight`` have shape ``(B,)``. The per-sample
    value sums over the data dimensions: EDM's code returns the same terms element by element
    and its training loop backpropagates their sum over the batch divided by the batch size,
    which is the mean over the batch of these per-sample values (``reduction="mean"``), so the
    gradient is EDM's (with its loss_scaling = 1). EDM's logged ``Loss/loss`` is their mean
    per element: this value divided by the dimension of ``y``.
    """
    eps = noise if noise is not None else _randn(tuple(y.shape), y)
    n = eps * _broadcast(sigma, y)
    D_yn = denoise(y + n, sigma)
    per_sample = weight * (D_yn - y).flatten(1).pow(2).sum(dim=1)
    return _reduce(per_sample, reduction)
