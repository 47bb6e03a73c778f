"""NICE and RealNVP, and the :class:`Flow` that every flow (Glow: ncsn.flows.glow) is: exact-
likelihood models that stand where a score network stands.

A :class:`Flow` is a bijection f from data x (B, *shape) to a flat latent z (B, D) with a
factorised prior p_Z, so that (change of variables, NICE eq. 1)

    log p(x) = log p_Z(f(x)) + log |det df/dx|.

``net(x, sigma)`` returns the score grad_x log p(x) by autograd (sigma is ignored), so every
score-matching objective and every Langevin sampler takes a flow as it takes a score network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncsn.flows.layers import (ActNorm, AdditiveCoupling, DiagonalScaling, Sequence,
                               alternating_mask)
from ncsn.nets.mlp import make_activation

PRIORS = ("gaussian", "logistic")


@dataclass(frozen=True)
class ExactSample:
    """Passed as ``sigma``, asks a flow for exact samples instead of its score:
    ``net(eps, ExactSample(T))`` reads eps (B, *shape) as standard normal draws, maps them
    to the prior at temperature T (through the prior's quantile function) and returns
    f^-1(z). Samplers reach the flow this way through any wrapper that passes sigma on
    (the trainer's autocast closure, the NFE counter)."""

    temperature: float = 1.0


@dataclass(frozen=True)
class LogDensity:
    """Passed as ``sigma``, asks a flow for log p(x) (B,) instead of its score, through its
    forward call, so that DistributedDataParallel's gradient averaging sees it (the
    ``loss=nll`` objective calls ``net(x, LogDensity())``)."""


# ----------------------------------------------------------------------------- priors
def prior_log_prob(z: Tensor, prior: str) -> Tensor:
    """log p_Z(z) (B,) of a factorised standard prior on z (B, D): Gaussian, or NICE's
    logistic, log p(z_d) = -log(1 + e^z_d) - log(1 + e^-z_d)."""
    if prior == "gaussian":
        return -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
    return -(F.softplus(z) + F.softplus(-z)).sum(1)


def prior_sample(n: int, dim: int, prior: str, temperature: float = 1.0,
                 generator: torch.Generator | None = None, device=None, dtype=None) -> Tensor:
    """n draws (n, D) of the prior with its scale multiplied by ``temperature`` (Glow Sec. 5:
    T < 1 trades diversity for fidelity); logistic by inverting its CDF."""
    if prior == "gaussian":
        z = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    else:
        u = torch.rand(n, dim, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        z = torch.log(u) - torch.log1p(-u)
    return (temperature * z).to(device=device, dtype=dtype or torch.get_default_dtype())


def prior_from_normal(eps: Tensor, prior: str, temperature: float = 1.0) -> Tensor:
    """Standard normal draws eps -> draws of the prior at ``temperature``: T eps for the
    Gaussian, T logit(Phi(eps)) for the logistic (Phi: the normal CDF). Any shape."""
    if prior == "gaussian":
        return temperature * eps
    log_u = torch.special.log_ndtr(eps)                  # log Phi(eps), log(1 - Phi) below
    return temperature * (log_u - torch.special.log_ndtr(-eps))


# ----------------------------------------------------------------------------- coupling nets
def mlp(dim_in: int, hidden: int, n_hidden: int, dim_out: int, zero_last: bool,
        activation: str = "relu") -> nn.Sequential:
    """An MLP with ``n_hidden`` hidden layers of ``hidden`` units and ``activation`` (a name
    in ncsn.nets.mlp.ACTIVATIONS): NICE's coupling function m; ``zero_last`` starts the
    coupling at the identity (Glow's zero init)."""
    layers, width = [], dim_in
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden), make_activation(activation)]
        width = hidden
    last = nn.Linear(width, dim_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


def conv_net(channels_in: int, hidden: int, channels_out: int) -> nn.Sequential:
    """Glow's coupling network NN(): 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialised 3x3
    conv. (RealNVP's residual networks are in :mod:`ncsn.flows.realnvp`.)"""
    last = nn.Conv2d(hidden, channels_out, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(channels_in, hidden, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last)


def _check_squeezable(shape: tuple[int, ...], n_squeezes: int, model: str) -> None:
    if len(shape) != 3:
        return
    factor = 2 ** n_squeezes
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(f"{model} squeezes {n_squeezes} times, so the image size must divide "
                         f"by {factor}, but the images are {shape[1]}x{shape[2]}; lower "
                         f"model.n_scales or pick dataset.image_size divisible by {factor}")


# ----------------------------------------------------------------------------- the flow
class Flow(nn.Module):
    """A normalizing flow on samples of ``shape``: ``transform`` maps x (flattened first
    when ``flat_input``) to a flat z (B, D) and back; ``prior`` names p_Z."""

    def __init__(self, shape: tuple[int, ...], transform: nn.Module, prior: str = "gaussian",
                 flat_input: bool = False):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"model.prior must be one of {', '.join(PRIORS)}, got {prior!r}")
        self.shape, self.transform, self.prior = tuple(shape), transform, prior
        self.flat_input = flat_input or len(self.shape) == 1
        self.dim = math.prod(self.shape)

    def forward_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z = f(x) (B, D) and log |det df/dx| (B,) for x (B, *shape)."""
        z, log_det = self.transform(x.flatten(1) if self.flat_input else x)
        return z.flatten(1), log_det

    def inverse_map(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """x = f^-1(z) (B, *shape) and log |det df^-1/dz| (B,) for z (B, D)."""
        x, log_det = self.transform.inverse(z)
        return x.reshape(-1, *self.shape), log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) (B,) in nats (NICE eq. 1)."""
        z, log_det = self.forward_map(x)
        return prior_log_prob(z, self.prior) + log_det

    def sample(self, n: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """n exact samples (n, *shape): x = f^-1(z), z from the prior at ``temperature``."""
        p = next(self.parameters())
        z = prior_sample(n, self.dim, self.prior, temperature, generator, p.device, p.dtype)
        return self.inverse_map(z)[0]

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor) -> bool:
        """Glow's data-dependent initialisation (Sec. 3.1) of every actnorm layer that has
        none yet, from batch ``x`` (B, *shape) (a distributed run's global batch: each rank
        passes its rows, the layers reduce their statistics), before the first step. The
        other layers pass ``x`` on in evaluation mode, so a batch-normalised flow's running
        averages stay. Returns whether any layer was initialised."""
        pending = [m for m in self.modules() if isinstance(m, ActNorm) and not m.initialized]
        if not pending:
            return False
        modes = {m: m.training for m in self.modules()}
        for m in self.modules():                 # not m.train(): it would set the children
            m.training = m in pending
        try:
            self.forward_map(x)
        finally:
            for m, mode in modes.items():
                m.training = mode
        return True

    def score(self, x: Tensor) -> Tensor:
        """grad_x log p(x) (B, *shape) by autograd; differentiable again when grad is on (the
        score-matching objectives differentiate it with respect to x and the weights)."""
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            # A view, not the leaf itself: torch's FLOP counter (trainer.num_threads=auto)
            # refuses autograd.grad with respect to a leaf under its module hooks.
            x_in = x_in.view_as(x_in)
            log_p = self.log_prob(x_in).sum()
            (grad,) = torch.autograd.grad(log_p, x_in, create_graph=create_graph)
        return grad

    def forward(self, x: Tensor, sigma: Tensor | ExactSample | LogDensity | None = None) -> Tensor:
        """The score s(x) = grad_x log p(x), as a score network ``net(x, sigma)``; sigma
        is ignored (an unconditional model), unless it is an :class:`ExactSample` or a
        :class:`LogDensity`."""
        if isinstance(sigma, LogDensity):
            return self.log_prob(x)
        if isinstance(sigma, ExactSample):
            z = prior_from_normal(x.flatten(1), self.prior, sigma.temperature)
            return self.inverse_map(z)[0]
        return self.score(x)


# ----------------------------------------------------------------------------- NICE
def nice(shape: tuple[int, ...], n_couplings: int = 4, hidden: int = 1000, n_hidden: int = 5,
         prior: str = "logistic", activation: str = "relu") -> Flow:
    """NICE (Dinh et al. 2015, Sec. 5.1, MNIST): ``n_couplings`` additive couplings on the
    flattened input with alternating odd/even partitions, each m() an MLP of ``n_hidden`` x
    ``hidden`` units, then the diagonal scaling layer; logistic prior, ReLU.

    The sliced score matching code's NICE (models/nice_approxbp.py) has softplus units, 4
    hidden layers and a Gaussian prior (``activation="softplus", n_hidden=4,
    prior="gaussian"``): score matching trains through second derivatives of m, which a
    ReLU network has zero almost everywhere."""
    dim = math.prod(shape)
    if dim < 2:
        raise ValueError(f"NICE splits the coordinates in two, but the data has {dim}")
    layers = [AdditiveCoupling(alternating_mask(dim, i % 2),
                               mlp(dim, hidden, n_hidden, dim, False, activation))
              for i in range(n_couplings)]
    return Flow(shape, Sequence([*layers, DiagonalScaling((dim,))]), prior, flat_input=True)


