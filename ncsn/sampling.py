"""Langevin samplers.

Both samplers run under ``torch.no_grad()`` on a whole batch ``x`` of shape ``(B, ...)``
and return the final batch, or ``(x, trajectory)`` with ``return_trajectory=True`` where
``trajectory`` is a CPU tensor of shape ``(K, B, ...)`` of snapshots of the chain.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

ScoreFn = Callable[[Tensor], Tensor]
ScoreNet = Callable[[Tensor, Tensor], Tensor]


def quiet(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when not asked for; when asked, shown on a terminal only."""
    return None if progress else True


def langevin_step(score: Tensor, x: Tensor, step_size: float | Tensor) -> Tensor:
    """One Langevin step: x + (eps/2) s(x) + sqrt(eps) z, z ~ N(0, I) (Gaussian noise)."""
    return x + 0.5 * step_size * score + step_size ** 0.5 * torch.randn_like(x)


@torch.no_grad()
def langevin(score_fn: ScoreFn, x: Tensor, step_size: float, n_steps: int,
             return_trajectory: bool = False, snapshot_every: int | None = None,
             progress: bool = False):
    """Langevin dynamics: n_steps of x <- x + (eps/2) s(x) + sqrt(eps) z.

    Snapshots (with ``return_trajectory``) are taken at the start and every
    ``snapshot_every`` steps (default: 50 snapshots over the chain) and at the end.
    """
    snapshot_every = snapshot_every or max(1, n_steps // 50)
    trajectory = [x.cpu()]
    for step in tqdm(range(1, n_steps + 1), desc="langevin", disable=quiet(progress), leave=False):
        x = langevin_step(score_fn(x), x, step_size)
        if return_trajectory and (step % snapshot_every == 0 or step == n_steps):
            trajectory.append(x.cpu())
    return (x, torch.stack(trajectory)) if return_trajectory else x


def annealed_step_sizes(sigmas: Tensor, step_lr: float) -> Tensor:
    """alpha_i = eps * sigma_i^2 / sigma_L^2 (NCSN, Algorithm 1, line 3)."""
    return step_lr * (sigmas / sigmas[-1]) ** 2


@torch.no_grad()
def annealed_langevin(net: ScoreNet, x: Tensor, sigmas: Tensor, step_lr: float,
                      n_steps_each: int, denoise: bool = False,
                      return_trajectory: bool = False, progress: bool = False,
                      known: Callable[[Tensor, int], Tensor] | None = None):
    """Annealed Langevin dynamics (NCSN, Algorithm 1).

    For each sigma_i from largest to smallest, ``n_steps_each`` steps of
    x <- x + (alpha_i/2) s(x, sigma_i) + sqrt(alpha_i) z with alpha_i = step_lr
    sigma_i^2 / sigma_L^2. With ``denoise=True``, NCSNv2's final step
    x <- x + sigma_L^2 s(x, sigma_L) (Tweedie's formula) removes the last noise.

    ``known(x, i)``, if given, is applied after every step at level i (inpainting uses it
    to overwrite the known pixels). Snapshots: the start, then the end of every level.
    """
    sigmas = sigmas.to(x.device, x.dtype)
    alphas = annealed_step_sizes(sigmas, step_lr)
    trajectory = [x.cpu()]
    for i in tqdm(range(len(sigmas)), desc="annealed langevin", disable=quiet(progress),
                  leave=False):
        sigma = sigmas[i].expand(x.shape[0])                     # (B,)
        for _ in range(n_steps_each):
            x = langevin_step(net(x, sigma), x, alphas[i])
            if known is not None:
                x = known(x, i)
        if return_trajectory:
            trajectory.append(x.cpu())
    if denoise:
        sigma_last = sigmas[-1].expand(x.shape[0])
        x = x + sigmas[-1] ** 2 * net(x, sigma_last)
        if known is not None:
            x = known(x, len(sigmas) - 1)
        if return_trajectory:
            trajectory.append(x.cpu())
    return (x, torch.stack(trajectory)) if return_trajectory else x


def ncsnv2_step_lr(sigmas: Tensor, n_steps_each: int) -> float:
    """NCSNv2's rule for step_lr (Technique 4): the eps that brings

        (1 - eps/s)^(2T) (gamma^2 - 2 eps / (s - s (1 - eps/s)^2)) + 2 eps / (s - s (1 - eps/s)^2)

    closest to 1, with s = sigma_L^2, gamma = sigma_(i-1)/sigma_i, T = n_steps_each. With
    a = eps/s the expression is (1 - a)^(2T) (gamma^2 - 2/(2 - a)) + 2/(2 - a), so the rule
    fixes a and eps = a sigma_L^2. Searched on a fine logarithmic grid of a in (0, 1).
    """
    gamma = float(sigmas[0] / sigmas[1])
    a = torch.logspace(-8, -1e-6, 200_001, dtype=torch.float64)
    two_over = 2 / (2 - a)
    value = (1 - a) ** (2 * n_steps_each) * (gamma ** 2 - two_over) + two_over
    return float(a[(value - 1).abs().argmin()] * float(sigmas[-1]) ** 2)
