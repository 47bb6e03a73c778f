"""Langevin samplers, in the convention of the authors' code.

Both repositories (ermongroup/ncsn, ermongroup/ncsnv2) step as

    x <- x + a s(x) + sqrt(2 a) z,    z ~ N(0, I),

with a = step_lr (sigma_i / sigma_L)^2 at noise level i (NCSNv2, Algorithm 1). The NCSN
paper's Algorithm 1 prints the same step as x + (eps/2) s(x) + sqrt(eps) z, so its eps is
2 a: a step size eps_paper from the paper's form is ``step_lr = eps_paper / 2`` here. The
published values (NCSN 2e-5; NCSNv2 6.2e-6, 3.3e-6, 4.9e-6, 1.8e-6) are the code's ``a``.

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
    """One Langevin step x + a s(x) + sqrt(2a) z with a = ``step_size`` and z ~ N(0, I),
    drawn after the score is computed, as in NCSNv2's code (the NCSN paper's form:
    x + (eps/2) s(x) + sqrt(eps) z, eps = 2a). ``score`` and ``x``: ``(B, ...)``."""
    a = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    return x + a * score + torch.randn_like(x) * (2 * a).sqrt()


@torch.no_grad()
def langevin(score_fn: ScoreFn, x: Tensor, step_size: float, n_steps: int,
             return_trajectory: bool = False, snapshot_every: int | None = None,
             progress: bool = False):
    """Langevin dynamics: n_steps of x <- x + a s(x) + sqrt(2a) z, a = ``step_size``.

    For a step size eps of the NCSN paper's form (eps/2, sqrt(eps)) pass eps / 2.
    Snapshots (with ``return_trajectory``) are taken at the start and every
    ``snapshot_every`` steps (default: 50 snapshots over the chain) and at the end.
    """
    snapshot_every = snapshot_every or max(1, n_steps // 50)
    trajectory = [x.cpu()]
    for step in tqdm(range(1, n_steps + 1), desc="langevin", unit="NFE", disable=quiet(progress),
                     leave=False):
        x = langevin_step(score_fn(x), x, step_size)
        if return_trajectory and (step % snapshot_every == 0 or step == n_steps):
            trajectory.append(x.cpu())
    return (x, torch.stack(trajectory)) if return_trajectory else x


def annealed_step_sizes(sigmas: Tensor, step_lr: float) -> Tensor:
    """a_i = step_lr sigma_i^2 / sigma_L^2 (NCSN and NCSNv2, Algorithm 1), computed in the
    dtype of ``sigmas`` as NCSNv2's code does: ``(L,)`` -> ``(L,)``."""
    return step_lr * (sigmas / sigmas[-1]) ** 2


@torch.no_grad()
def annealed_langevin(net: ScoreNet, x: Tensor, sigmas: Tensor, step_lr: float,
                      n_steps_each: int, denoise: bool = False,
                      return_trajectory: bool = False, progress: bool = False,
                      known: Callable[[Tensor, int], Tensor] | None = None):
    """Annealed Langevin dynamics as the authors' code runs it (NCSN and NCSNv2, Algorithm 1).

    For each sigma_i from largest to smallest, ``n_steps_each`` steps of
    x <- x + a_i s(x, sigma_i) + sqrt(2 a_i) z with a_i = step_lr sigma_i^2 / sigma_L^2
    (the NCSN paper prints x + (alpha_i/2) s + sqrt(alpha_i) z: alpha_i = 2 a_i). With
    ``denoise=True``, NCSNv2's final step x <- x + sigma_L^2 s(x, sigma_L) (Tweedie's
    formula) removes the last noise. From the same seed and start the chain draws the same
    noise in the same order as the reference's ``anneal_Langevin_dynamics``.

    ``x``: ``(B, ...)`` starting points; ``sigmas``: ``(L,)``, largest first.
    ``known(x, i)``, if given, is applied before every evaluation of the network at level i
    (the steps, then the denoising step at level L-1): inpainting uses it to overwrite the
    known pixels, a recorder to watch the chain. Snapshots: the start, then the end of every
    level, then the denoised batch.
    """
    sigmas = sigmas.to(x.device, x.dtype)
    alphas = annealed_step_sizes(sigmas, step_lr)
    trajectory = [x.cpu()]
    # The bar counts network evaluations (NFE): L T, plus one for the denoising step.
    bar = tqdm(total=len(sigmas) * n_steps_each + int(denoise), desc="annealed langevin",
               unit="NFE", disable=quiet(progress), leave=False)
    for i in range(len(sigmas)):
        sigma = sigmas[i].expand(x.shape[0])                     # (B,)
        for _ in range(n_steps_each):
            if known is not None:
                x = known(x, i)
            x = langevin_step(net(x, sigma), x, alphas[i])
        bar.update(n_steps_each)
        if return_trajectory:
            trajectory.append(x.cpu())
    if denoise:
        if known is not None:
            x = known(x, len(sigmas) - 1)
        x = x + sigmas[-1] ** 2 * net(x, sigmas[-1].expand(x.shape[0]))
        bar.update(1)
        if return_trajectory:
            trajectory.append(x.cpu())
    bar.close()
    return (x, torch.stack(trajectory)) if return_trajectory else x


def ncsnv2_step_lr(sigmas: Tensor, n_steps_each: int) -> float:
    """NCSNv2's rule for step_lr (Technique 4), in the convention of the samplers here
    (x + a s + sqrt(2a) z, a = step_lr sigma_i^2 / sigma_L^2, as NCSNv2 derives it): the
    step_lr that brings

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


class CountingNet:
    """A score network ``net(x, sigma)`` that counts its evaluations: ``nfe`` is the number
    of calls, each on a whole batch, so it is the network evaluations (NFE) of one chain.
    Every sampler can be handed one: ``counted = CountingNet(net); sampler(counted, x);
    counted.nfe``."""

    def __init__(self, net: ScoreNet):
        self.net, self.nfe = net, 0

    def __call__(self, x: Tensor, sigma: Tensor | None) -> Tensor:
        self.nfe += 1
        return self.net(x, sigma)
