"""Invertible layers of NICE (Dinh et al. 2015), RealNVP (Dinh et al. 2017) and Glow
(Kingma & Dhariwal 2018).

Every layer is a bijection with ``forward(x) -> (y, log_det)`` and
``inverse(y) -> (x, log_det)``, where ``log_det`` (B,) is log |det dy/dx| for the forward map
and log |det dx/dy| (its negative at the same pair) for the inverse. Layers take points
(B, D) or images (B, C, H, W); "channels" of points are their D coordinates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncsn import distributed


def _zeros(x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0])


def _pixels(x: Tensor) -> int:
    """Positions sharing one per-channel parameter: H W for images, 1 for points."""
    return x[0, 0].numel()


def _per_channel(param: Tensor, x: Tensor) -> Tensor:
    """A (C,) parameter shaped to broadcast against ``x`` (B, C) or (B, C, H, W)."""
    return param.view(1, -1, *([1] * (x.dim() - 2)))


# ----------------------------------------------------------------------------- masks
def alternating_mask(dim: int, parity: int) -> Tensor:
    """NICE's partition of D coordinates into odd and even indices: 1 where i % 2 == parity."""
    return (torch.arange(dim) % 2 == parity).float()


def checkerboard_mask(shape: tuple[int, int, int], parity: int) -> Tensor:
    """RealNVP's checkerboard (Fig. 3, left): 1 where (i + j) % 2 == parity, all channels."""
    c, h, w = shape
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((i + j) % 2 == parity).float().expand(c, h, w).clone()


def channel_mask(shape: tuple[int, ...], parity: int) -> Tensor:
    """RealNVP's channel-wise mask (Fig. 3, right): 1 on the first half of the channels
    (parity 0) or the second (parity 1). Points: the first or second half of the coordinates."""
    c = shape[0]
    first = (torch.arange(c) < c // 2).float()
    mask = first if parity == 0 else 1 - first
    return mask.view(c, *([1] * (len(shape) - 1))).expand(*shape).clone()


# ----------------------------------------------------------------------------- couplings
class AdditiveCoupling(nn.Module):
    """NICE eq. (4) on a mask m: y = x + (1 - m) t(m x); log-det 0 (volume preserving)."""

    def __init__(self, mask: Tensor, net: nn.Module):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + (1 - self.mask) * self.net(self.mask * x), _zeros(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y - (1 - self.mask) * self.net(self.mask * y), _zeros(y)


class AffineCoupling(nn.Module):
    """Affine coupling on a mask m; the network gives (log-scale input h, shift t) from m x.

    ``scale="tanh"`` (RealNVP eq. 9, y = m x + (1 - m)(x exp(s) + t)) with s = a tanh(h), a
    learned per coordinate as in RealNVP's code; ``scale="sigmoid"`` (Glow's code:
    y = (x + t) sigmoid(h + 2) on the unmasked part; the paper prints y = s x + t with
    s = exp(log s)). log |det| = sum over the unmasked part of log s.
    """

    def __init__(self, mask: Tensor, net: nn.Module, scale: str = "tanh"):
        super().__init__()
        if scale not in ("tanh", "sigmoid"):
            raise ValueError(f"coupling scale must be 'tanh' or 'sigmoid', got {scale!r}")
        self.register_buffer("mask", mask)
        self.net, self.scale = net, scale
        self.tanh_scale = nn.Parameter(torch.ones(mask.shape[0])) if scale == "tanh" else None

    def _log_scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, t = self.net(self.mask * x).chunk(2, dim=1)
        if self.scale == "tanh":
            log_s = _per_channel(self.tanh_scale, x) * torch.tanh(h)
        else:
            log_s = F.logsigmoid(h + 2.0)
        free = 1 - self.mask
        return free * log_s, free * t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_s, t = self._log_scale_shift(x)
        y = (x + t) * log_s.exp() if self.scale == "sigmoid" else x * log_s.exp() + t
        return y, log_s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        log_s, t = self._log_scale_shift(y)       # m y = m x: the same network input
        x = y * (-log_s).exp() - t if self.scale == "sigmoid" else (y - t) * (-log_s).exp()
        return x, -log_s.flatten(1).sum(1)


# ----------------------------------------------------------------------------- reshaping
class Squeeze(nn.Module):
    """RealNVP's squeeze: (C, H, W) -> (4C, H/2, W/2), each 2x2 block into channels; log-det 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"squeeze halves height and width, but the images are {h}x{w}; "
                             f"use an even image size (dataset.image_size) or fewer scales")
        y = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, 4 * c, h // 2, w // 2), _zeros(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        b, c4, h, w = y.shape
        x = y.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c4 // 4, 2 * h, 2 * w), _zeros(y)


# ----------------------------------------------------------------------------- scalings
class DiagonalScaling(nn.Module):
    """NICE's last layer (Sec. 3.3): y = exp(s) x per coordinate; log |det| = sum s."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(shape))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y * (-self.log_scale).exp(), -self.log_scale.sum().expand(y.shape[0])


class ActNorm(nn.Module):
    """Glow's actnorm (Sec. 3.1): y = (x + b) exp(log s) per channel; log |det| = HW sum log s.

    Data-dependent initialisation: the first forward pass in training mode sets b and log s
    so that that batch's output has zero mean and unit variance per channel (Glow's code
    divides by std + 1e-6). A batch with a channel of no spread (a single point, the
    trainer's all-zero probe for counting FLOPs) cannot be standardised and leaves it
    uninitialised. ``initialized`` is a buffer, so checkpoints carry it.

    ``logscale_factor``: the parameter ``log_scale`` holds log s / logscale_factor, as
    Glow's code (tfops.actnorm_scale, logscale_factor=3) stores it: the same map, but an
    optimiser's steps in log s are that many times larger.
    """

    def __init__(self, channels: int, logscale_factor: float = 1.0):
        super().__init__()
        self.logscale_factor = logscale_factor
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(0.0))

    def log_s(self) -> Tensor:
        """log s (C,)."""
        return self.logscale_factor * self.log_scale

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """b and log s from ``x``'s statistics; in a distributed run, from the global batch's
        (every rank's rows reduced), so that every replica starts alike, as one process."""
        per_channel = x.detach().transpose(0, 1).flatten(1)
        mean, var = distributed.global_moments(per_channel)
        std = var.sqrt()
        if not bool((std > 0).all()):
            return
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6) / self.logscale_factor)
        self.initialized.fill_(1.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.initialized:
            self.initialize(x)
        log_s = self.log_s()
        y = (x + _per_channel(self.bias, x)) * _per_channel(log_s, x).exp()
        return y, (_pixels(x) * log_s.sum()).expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        log_s = self.log_s()
        x = y * _per_channel(-log_s, y).exp() - _per_channel(self.bias, y)
        return x, (-_pixels(y) * log_s.sum()).expand(y.shape[0])


class BatchNorm(nn.Module):
    """RealNVP's batch normalisation as a bijection (Dinh et al. 2017, Sec. 3.7, App. E):
    per channel, y = (x - mu) / sqrt(var + eps) exp(log_gamma) + beta, so
    log |det| = HW sum over channels of (log_gamma - 0.5 log(var + eps)).

    Training mode: (mu, var) are the batch's mean and (biased) variance per channel, with
    gradients through them, and the running averages move toward them by ``momentum``.
    Evaluation mode, and the inverse in either mode (sampling): the running averages, so
    the map is a fixed per-channel affine bijection and one sample's density does not depend
    on its batch. The log-det counts the statistics as constants, as the paper's does.

    eps = 1e-4 and momentum 0.1 (running += 0.1 (batch - running)) are the authors' code's
    (tensorflow/models research/real_nvp: the couplings' ``bn_out`` calls
    ``batch_norm_log_diff`` with epsilon=1e-4, decay=.1). That code normalises only the
    coupling's transformed half and learns no gamma and beta there; here the layer follows
    every coupling on all channels, with MAF's (Papamakarios et al. 2017, eq. 22) learned
    log_gamma and beta, zero at the start, where it is the authors' map.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-4):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, var) (C,) used on ``x``: the batch's in training mode (updating the running
        averages), the running averages otherwise. In a distributed run the batch is the
        global one (synchronised over the ranks, as SyncBatchNorm), so N ranks train as one
        process."""
        if not self.training:
            return self.running_mean, self.running_var
        mean, var = distributed.global_moments(x.transpose(0, 1).flatten(1))
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        return mean, var

    def _log_scale(self, var: Tensor) -> Tensor:
        """log of the per-channel factor exp(log_gamma) / sqrt(var + eps) (C,)."""
        return self.log_gamma - 0.5 * torch.log(var + self.eps)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self.statistics(x)
        log_scale = self._log_scale(var)
        y = (x - _per_channel(mean, x)) * _per_channel(log_scale, x).exp() \
            + _per_channel(self.beta, x)
        return y, (_pixels(x) * log_scale.sum()).expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        log_scale = self._log_scale(self.running_var)
        x = (y - _per_channel(self.beta, y)) * _per_channel(-log_scale, y).exp() \
            + _per_channel(self.running_mean, y)
        return x, (-_pixels(y) * log_scale.sum()).expand(y.shape[0])


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1x1 convolution (Sec. 3.2): y = W x at every pixel, W (C, C) started
    as a random rotation; log |det| = HW log |det W|. Points: y = W x.

    ``lu=True`` (Glow eq. 10): W = P L (U + diag(sign(s) exp(log |s|))), P a fixed
    permutation, L unit lower triangular, U strictly upper triangular, so log |det W| =
    sum log |s| costs O(C) and W stays invertible for any finite parameters.
    """

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        self.lu = lu
        if not lu:
            self.weight = nn.Parameter(w.float())
            return
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("p", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def weight_matrix(self) -> Tensor:
        """W (C, C)."""
        if not self.lu:
            return self.weight
        eye = torch.eye(len(self.log_s), dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.p @ lower @ upper

    def log_abs_det(self) -> Tensor:
        """log |det W| (a scalar)."""
        return self.log_s.sum() if self.lu else torch.linalg.slogdet(self.weight)[1]

    @staticmethod
    def _conv(w: Tensor, x: Tensor) -> Tensor:
        return torch.einsum("ij,bj...->bi...", w, x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (self._conv(self.weight_matrix(), x),
                (_pixels(x) * self.log_abs_det()).expand(x.shape[0]))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return (self._conv(torch.linalg.inv(self.weight_matrix()), y),
                (-_pixels(y) * self.log_abs_det()).expand(y.shape[0]))


# ----------------------------------------------------------------------------- composition
class Sequence(nn.Module):
    """Layers applied in order; log-dets add."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = _zeros(x)
        for layer in self.layers:
            x, log_det = layer(x)
            total = total + log_det
        return x, total

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        total = _zeros(y)
        for layer in reversed(self.layers):
            y, log_det = layer.inverse(y)
            total = total + log_det
        return y, total


class MultiScale(nn.Module):
    """RealNVP's multi-scale architecture (Sec. 3.6): ``steps`` map x to an image of
    ``shape`` (C, H, W); its last C/2 channels leave under the standard prior, and the first
    half goes on through ``rest`` (the next scale). Glow's learned prior for the leaving half
    is a layer at the end of ``steps`` (:class:`ncsn.flows.glow.SplitPrior`).
    Output flat (B, D): the factored-out half first, then ``rest``'s (flat) output.
    """

    def __init__(self, steps: nn.Module, shape: tuple[int, int, int], rest: nn.Module):
        super().__init__()
        self.steps, self.rest, self.shape = steps, rest, tuple(shape)
        self.keep = shape[0] - shape[0] // 2

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, log_det = self.steps(x)
        z1, z2 = y[:, :self.keep], y[:, self.keep:]
        rest, rest_log_det = self.rest(z1)
        return torch.cat([z2.flatten(1), rest], 1), log_det + rest_log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        c, h, w = self.shape
        n2 = (c - self.keep) * h * w
        z2 = z[:, :n2].reshape(-1, c - self.keep, h, w)
        z1, log_det = self.rest.inverse(z[:, n2:])
        x, steps_log_det = self.steps.inverse(torch.cat([z1, z2], 1))
        return x, log_det + steps_log_det


class Flatten(nn.Module):
    """A layer whose output, an image of ``shape`` (C, H, W), is flattened to (B, D), as
    MultiScale's output is: the last scale of a multi-scale flow."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.layer, self.shape = layer, tuple(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, log_det = self.layer(x)
        return y.flatten(1), log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer.inverse(z.reshape(-1, *self.shape))
