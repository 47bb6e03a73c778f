"""Maximum likelihood for flows, counted in bits per dimension of the discrete data, and
the exact sampler.

Images are uniformly dequantized by the data pipeline (``dataset.uniform_dequantization``):
y = (x (K - 1) + u) / K puts each K-level pixel value in a cell of width 1/K, so
log P(x) >= E_u[log p_Y(y)] - d log K (Theis et al. 2016). The flow sees z = g(y) (identity,
2y - 1 or the logit transform, RealNVP Sec. 4.1) and gives log p_Z(z); then
log p_Y(y) = log p_Z(z) + log |det dz/dy| and

    bits/dim = -(log p_Z(z) + log |det dz/dy| - d log K) / (d log 2),

the number the NICE, RealNVP and Glow papers report.
"""
from __future__ import annotations


import torch
from torch import Tensor, nn

from ncsn.data.images import ModelSpace, pixel_levels  # noqa: F401 (re-exported)
from ncsn.flows.models import ExactSample, LogDensity
from ncsn.likelihood import bits_per_dim

FLOW_MODELS = ("nice", "realnvp", "glow")


def negative_log_likelihood(log_p: Tensor, z: Tensor, space: ModelSpace = ModelSpace(),
                            levels: int | None = 256) -> Tensor:
    """Per sample (B,): bits/dim of K = ``levels``-level data from the model-space
    log-density ``log_p`` (B,) at the dequantized points ``z`` (B, ...) (module docstring);
    ``levels=None``: continuous data, -log p in nats. Differentiable in ``log_p``."""
    return -log_p if levels is None else bits_per_dim(log_p, z, space, levels).to(log_p.dtype)


def nll_objective(space: ModelSpace, levels: int | None):
    """``objective(net, x) -> (per-sample NLL (B,), None)`` for a flow ``net`` (its
    ``log_prob``): bits/dim for images, nats for points."""
    def objective(net: nn.Module, x: Tensor):
        return negative_log_likelihood(net(x, LogDensity()), x, space, levels), None
    return objective


def exact_samples(net, x: Tensor, temperature: float = 1.0, return_trajectory: bool = False,
                  progress: bool = False, known=None):
    """The ``flow`` sampler: x = f^-1(z), z from the prior at ``temperature``, with ``x``
    (B, *shape) the standard normal draws it is read from (one network evaluation).
    ``return_trajectory``: also the two frames (2, B, ...), the draws and the samples."""
    if known is not None:
        raise ValueError("sampler=flow draws from the flow's density and cannot hold known "
                         "pixels; inpaint with sampler=langevin (the flow's score)")
    with torch.no_grad():
        samples = net(x, ExactSample(temperature)).to(x.dtype)
    if return_trajectory:
        return samples, torch.stack([x, samples])
    return samples
