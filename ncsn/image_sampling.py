"""Image sampling beyond plain draws: inpainting, interpolation and the record of a chain.

Everything here works on tensors and any score network ``net(x, sigma)``, with no config
and no files, so a notebook can call it directly:

    mask = make_mask("half", images.shape)                        # (B, 1, H, W), True = known
    completions = inpaint(net, images, mask, sigmas, step_lr=2e-5, n_steps_each=100)
    rows = interpolate(net, sigmas, start, step_lr=6.2e-6, n_steps_each=5)   # (R, K, C, H, W)

Images are ``(B, C, H, W)`` tensors. Unless said otherwise a function works in the model's
space (the space the network was trained in); ``inpaint`` takes data-space images and the
maps between the two spaces, so that its promise (known pixels come back exactly) holds in
the space the user looks at.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ncsn.sampling import annealed_langevin, annealed_step_sizes, quiet

Map = Callable[[Tensor], Tensor]
MASKS = ("half", "center", "random")
RENOISE = ("level", "step")


def _identity(x: Tensor) -> Tensor:
    return x


# ----------------------------------------------------------------------------- masks
def make_mask(kind: str, shape, fraction: float = 0.5,
              generator: torch.Generator | None = None) -> Tensor:
    """A boolean mask ``(B, 1, H, W)`` for images of ``shape`` ``(B, C, H, W)``; True marks a
    known pixel (all channels alike).

    ``half``: the right half is unknown (NCSN's code keeps the left half); ``center``: a
    centred square of side ``round(sqrt(fraction) * H)`` is unknown (``fraction`` 0.25: half
    the side); ``random``: each pixel is unknown with probability ``fraction``, drawn per
    image with ``generator``.
    """
    b, _, h, w = shape
    if kind not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {kind!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the mask's unknown fraction must lie in (0, 1), got {fraction}")
    known = torch.ones(b, 1, h, w, dtype=torch.bool)
    if kind == "half":
        known[..., w // 2:] = False
    elif kind == "center":
        side_h = max(1, round(math.sqrt(fraction) * h))
        side_w = max(1, round(math.sqrt(fraction) * w))
        top, left = (h - side_h) // 2, (w - side_w) // 2
        known[..., top:top + side_h, left:left + side_w] = False
    else:
        known = torch.rand(b, 1, h, w, generator=generator) >= fraction
    return known


def masked_picture(images: Tensor, mask: Tensor, fill: float = 0.5) -> Tensor:
    """Data-space images with the unknown pixels painted ``fill`` (grey), for pictures."""
    return torch.where(mask.to(images.device), images, torch.full_like(images, fill))


# ----------------------------------------------------------------------------- inpainting
class KnownPixels:
    """The ``known(x, i)`` callback of annealed Langevin for inpainting: before every step at
    noise level i the known pixels are set to y + sigma_i z, data perturbed to that level,
    and the unknown pixels are left to the chain.

    ``renoise`` says when z is drawn: ``"level"``, once per noise level (the NCSN paper's
    inpainting algorithm and ermongroup/ncsn's ``anneal_Langevin_dynamics_inpainting``), or
    ``"step"``, afresh before every step (ermongroup/ncsnv2's). z has one entry per known
    value, drawn in row-major order, so that with the reference's half mask the draws are
    the reference's, in the same order.

    ``y``: known images in model space ``(B, C, H, W)``; ``mask``: ``(B or 1, 1 or C, H, W)``,
    True = known; ``sigmas``: ``(L,)``.
    """

    def __init__(self, y: Tensor, mask: Tensor, sigmas: Tensor, renoise: str = "level"):
        if renoise not in RENOISE:
            raise ValueError(f"renoise must be one of {', '.join(RENOISE)}, got {renoise!r}")
        self.where = mask.to(y.device).bool().expand_as(y)            # (B, C, H, W)
        self.y_known = y[self.where]                                    # (N_known,)
        self.sigmas, self.renoise = sigmas.to(y), renoise
        self.level, self.perturbed = None, None

    def __call__(self, x: Tensor, i: int) -> Tensor:
        if self.renoise == "step" or i != self.level:
            self.level = i
            self.perturbed = self.y_known + torch.randn_like(self.y_known) * self.sigmas[i]
        return x.masked_scatter(self.where, self.perturbed)


@torch.no_grad()
def inpaint(net: nn.Module, images: Tensor, mask: Tensor, sigmas: Tensor, step_lr: float,
            n_steps_each: int, denoise: bool = False, x_init: Tensor | None = None,
            to_model: Map = _identity, to_data: Map = _identity, renoise: str = "level",
            progress: bool = False) -> Tensor:
    """Fill in the unknown pixels of ``images`` with annealed Langevin dynamics whose known
    pixels are set to perturbed data before every step (NCSN, Section 5; the reference
    code's ``anneal_Langevin_dynamics_inpainting``).

    Args:
        net: a score network ``net(x, sigma)`` in model space.
        images: ``(B, C, H, W)`` in data space; only the known pixels are read.
        mask: ``(B or 1, 1 or C, H, W)`` booleans, True where a pixel is known.
        sigmas: the noise table ``(L,)``, largest first.
        step_lr, n_steps_each: annealed Langevin's step size (the code's convention, see
            :mod:`ncsn.sampling`) and steps per level.
        denoise: a final step x + sigma_L^2 s(x, sigma_L) after the known pixels are set
            once more; the reference's inpainting chains have none.
        x_init: starting points ``(B, C, H, W)`` in model space; default ``to_model`` of
            uniform noise on [0, 1] (the reference's initialisation).
        to_model, to_data: the maps from data space to model space and back.
        renoise: ``"level"`` (NCSN's code: the known pixels' noise is drawn once per level)
            or ``"step"`` (NCSNv2's code: drawn afresh before every step).

    Returns ``(B, C, H, W)`` completions in data space whose known pixels equal ``images``
    exactly (they are pasted back after the last step, in data space).
    """
    mask = mask.to(images.device).bool()
    y = to_model(images)
    if x_init is None:
        x_init = to_model(torch.rand_like(images))
    known = KnownPixels(y, mask, sigmas.to(y.device), renoise)
    x = annealed_langevin(net, x_init.to(y.device), sigmas.to(y.device), step_lr, n_steps_each,
                          denoise, progress=progress, known=known)
    return torch.where(mask, images, to_data(x))


# ----------------------------------------------------------------------------- interpolation
def _circle_weights(n: int, device) -> tuple[Tensor, Tensor]:
    """(cos theta_k, sin theta_k) for theta_k = (pi / 2) k / (n - 1), computed in float32 on
    ``device`` as NCSNv2's code does: chain 0 gets exactly (1, 0); the last chain gets
    (cos(pi/2) = -4.4e-8 in float32, 1), a plain chain up to that round-off."""
    theta = torch.linspace(0.0, math.pi / 2, n, device=device)
    return theta.cos(), theta.sin()


def _mix(a: Tensor, b: Tensor, cos: Tensor, sin: Tensor, center: float = 0.0) -> Tensor:
    """(R, ...) and (R, ...) -> (R, K, ...): center + cos_k (a - center) + sin_k (b - center).
    For a, b ~ N(0, I) every mix is N(0, I) too (cos^2 + sin^2 = 1)."""
    shape = (1, -1) + (1,) * (a.dim() - 1)
    return (center + cos.view(shape) * (a - center).unsqueeze(1)
            + sin.view(shape) * (b - center).unsqueeze(1))


@torch.no_grad()
def interpolate(net: nn.Module, sigmas: Tensor, start: Tensor, step_lr: float,
                n_steps_each: int, n_interpolations: int = 10, denoise: bool = False,
                end: Tensor | None = None, interpolate_noise: bool = True,
                center: float = 0.0, generator: torch.Generator | None = None,
                progress: bool = False) -> Tensor:
    """Interpolation between samples with annealed Langevin dynamics whose noise is fixed
    per row (NCSNv2's repository, ``anneal_Langevin_dynamics_interpolation``).

    Each of the R rows runs ``n_interpolations`` chains k = 0..K-1 with theta_k = (pi/2)
    k/(K-1). Every step of every chain draws its noise as cos theta_k z_p + sin theta_k z_q
    from two noises z_p, z_q shared by the row (still N(0, I), so each chain is a correct
    annealed Langevin chain); neighbouring chains see nearly the same noise and end as
    nearby samples. Chain 0 sees z_p alone and chain K-1 z_q alone (up to float32's
    cos(pi/2) = -4.4e-8, as in the reference): the two end points are independent samples.
    The step is the code's x + a_i s + sqrt(2 a_i) z; z_p, z_q are drawn after the score,
    in the reference's order; like the reference, no denoising step unless ``denoise``.

    Args:
        start: ``(R, C, H, W)`` starting points in model space, shared by a row's chains.
        end: optional ``(R, C, H, W)``: the chains start on the arc center + cos theta_k
            (start - center) + sin theta_k (end - center) instead (``center``: the middle
            of the starting distribution, 0 for Gaussian starts, 0.5 for uniform on [0, 1]).
        interpolate_noise: False with ``end`` given: every chain of a row uses z_p, so
            only the start is interpolated.
        generator: draws z_p and z_q (on the generator's device; default torch's global
            generator), so that the end chains do not depend on ``n_interpolations``.

    Returns ``(R, K, C, H, W)`` samples in model space.
    """
    if n_interpolations < 2:
        raise ValueError(f"n_interpolations must be at least 2, got {n_interpolations}")
    if end is None and not interpolate_noise:
        raise ValueError("with a shared start and a shared noise every chain would be the "
                         "same: pass end= or interpolate_noise=True")
    rows, k, device = start.shape[0], n_interpolations, start.device
    cos, sin = _circle_weights(k, device)
    x = _mix(start, end, cos, sin, center) if end is not None else \
        start.unsqueeze(1).expand(rows, k, *start.shape[1:])
    x = x.reshape(rows * k, *start.shape[1:])                       # (R K, C, H, W)
    sigmas = sigmas.to(device, start.dtype)
    alphas = annealed_step_sizes(sigmas, step_lr)
    noise_device = generator.device if generator is not None else device

    def noise() -> Tensor:
        z_p = torch.randn(start.shape, generator=generator, device=noise_device).to(device)
        z_q = torch.randn(start.shape, generator=generator, device=noise_device).to(device)
        z = _mix(z_p, z_q, cos, sin) if interpolate_noise else \
            z_p.unsqueeze(1).expand(rows, k, *start.shape[1:])
        return z.reshape_as(x)

    for i in tqdm(range(len(sigmas)), desc="interpolation", disable=quiet(progress), leave=False):
        sigma = sigmas[i].expand(x.shape[0])
        for _ in range(n_steps_each):
            x = x + alphas[i] * net(x, sigma) + noise() * (2 * alphas[i]).sqrt()
    if denoise:
        x = x + sigmas[-1] ** 2 * net(x, sigmas[-1].expand(x.shape[0]))
    return x.reshape(rows, k, *start.shape[1:])


# ----------------------------------------------------------------------------- trajectories
class TrajectoryRecorder:
    """A record of the first ``n_chains`` chains of one annealed Langevin run: the start,
    the end of every ``every``-th noise level, and the final state (after the denoising
    step when there is one). Frames are kept as uint8 data-space images, so a record of a
    thousand levels stays small.

    Use: ``recorder.start(x)``, pass ``known=recorder`` to :func:`annealed_langevin` (it
    sees the chain before every step and returns it unchanged), ``recorder.finish(x)``.
    """

    def __init__(self, n_chains: int = 16, to_data: Map = _identity, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.n_chains, self.to_data, self.every = n_chains, to_data, every
        self.frames: list[Tensor] = []
        self.level = 0

    def _snapshot(self, x: Tensor) -> None:
        images = self.to_data(x[:self.n_chains].detach()).clamp(0, 1)
        self.frames.append(images.mul(255).add(0.5).floor().to(torch.uint8).cpu())

    def start(self, x: Tensor) -> None:
        self.frames, self.level = [], 0
        self._snapshot(x)

    def __call__(self, x: Tensor, i: int) -> Tensor:
        if i != self.level:                       # x is the chain at the end of self.level
            if self.level % self.every == 0:
                self._snapshot(x)
            self.level = i
        return x

    def finish(self, x: Tensor) -> None:
        self._snapshot(x)
