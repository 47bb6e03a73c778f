"""Score networks for low-dimensional data: multilayer perceptrons.

All follow ``net(x, sigma)``: ``x`` of shape ``(B, d)``, ``sigma`` of shape ``(B,)``;
the output is a score of shape ``(B, d)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ncsn.noise import sigma_index

ACTIVATIONS = {"softplus": nn.Softplus, "silu": nn.SiLU, "elu": nn.ELU, "relu": nn.ReLU}


def make_activation(name: str) -> nn.Module:
    """The activation module called ``name``, one of ``ACTIVATIONS``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class ScoreMLP(nn.Module):
    """Unconditional score network s(x): an MLP that ignores sigma.

    For objectives that learn the score of the data itself (exact and sliced score
    matching, denoising score matching at one sigma).
    """

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3,
                 activation: str = "softplus"):
        super().__init__()
        layers, width = [], dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), make_activation(activation)]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        return self.net(x)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 1e4) -> Tensor:
    """Transformer-style sinusoidal features of a scalar per sample: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ConditionalMLP(nn.Module):
    """Noise-conditional score network s(x, sigma) for low-dimensional data.

    ``embedding="multiplicative"``: the NCSN toy network's conditional linear layers, each
    hidden layer's output multiplied by a learned per-noise-level vector gamma[i], where i is
    sigma's index in the table the network was built with.
    ``embedding="log_sigma"``: sinusoidal features of log sigma, projected and added to
    every hidden layer (works for any sigma, not only the table's).
    ``scale_by_sigma=True`` divides the output by sigma (NCSNv2, Technique 3).
    """

    def __init__(self, dim: int, sigmas: Tensor, hidden: int = 128, n_layers: int = 3,
                 embedding: str = "log_sigma", embedding_dim: int = 32,
                 activation: str = "softplus", scale_by_sigma: bool = False):
        super().__init__()
        if embedding not in ("multiplicative", "log_sigma"):
            raise ValueError(f"embedding must be 'multiplicative' or 'log_sigma', got {embedding!r}")
        self.embedding, self.embedding_dim, self.scale_by_sigma = embedding, embedding_dim, scale_by_sigma
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32).clone())
        widths = [dim] + [hidden] * n_layers
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = make_activation(activation)
        if embedding == "multiplicative":
            self.gammas = nn.ModuleList(nn.Embedding(len(sigmas), hidden) for _ in range(n_layers))
            for gamma in self.gammas:
                nn.init.uniform_(gamma.weight)                   # as in the NCSN toy model
        else:
            self.cond = nn.ModuleList(nn.Linear(embedding_dim, hidden) for _ in range(n_layers))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.embedding == "multiplicative":
            idx = sigma_index(sigma, self.sigmas)
            conds = [lambda h, g=g: h * g(idx) for g in self.gammas]
        else:
            e = sinusoidal_embedding(sigma.log(), self.embedding_dim, max_period=100.0)
            conds = [lambda h, c=c: h + c(e) for c in self.cond]
        h = x
        for linear, cond in zip(self.linears, conds):
            h = self.act(cond(linear(h)))
        out = self.out(h)
        return out / sigma[:, None] if self.scale_by_sigma else out
