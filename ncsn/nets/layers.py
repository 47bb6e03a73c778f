"""Layers shared by the image score networks.

Three families:

* instance normalization++ (NCSN, NCSNv2), conditional and unconditional;
* the RefineNet of NCSN and NCSNv2: pre-activation residual blocks whose subsampling is
  mean pooling or, deeper in the network, dilation; residual conv units, multi-resolution
  fusion and chained residual pooling; and :class:`RefineNet`, the cascade built from them;
* U-Net pieces: residual blocks conditioned on a noise embedding by scale and shift, group
  normalization, self-attention, up/down sampling, and embeddings of log sigma.

Every normalization layer of the RefineNet is called as ``norm(x, idx)``, where ``idx``
(shape ``(B,)``, long) is each sample's noise-level index: the conditional layer looks its
parameters up with it, the unconditional ones ignore it. NCSN (conditional) and NCSNv2
(unconditional) therefore share every RefineNet block.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncsn.nets.mlp import sinusoidal_embedding

NormFactory = Callable[[int], nn.Module]   # number of channels -> a layer called as norm(x, idx)


def conv3x3(in_ch: int, out_ch: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 convolution that keeps the spatial size (padding = dilation)."""
    return nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=bias)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the weight and bias: a residual branch (or the output) starts as nothing (DDPM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ============================================================ instance normalization++
def instance_norm_plus(x: Tensor, gamma: Tensor, beta: Tensor, alpha: Tensor,
                       eps: float = 1e-5) -> Tensor:
    """z_k = gamma_k ((x_k - mu_k) / s_k + alpha_k (mu_k - m) / v) + beta_k.

    ``x`` is ``(B, C, H, W)`` with C >= 2; ``gamma``, ``beta``, ``alpha`` are ``(B, C)`` or
    ``(1, C)``. mu_k and s_k are the spatial mean and standard deviation of channel k (s_k
    with eps inside the root, as torch's instance norm); m and v the mean and standard
    deviation of the mu_k over the C channels, v = sqrt(var(mu) + eps) with the UNBIASED
    variance (divisor C - 1), as the authors' code computes it (``torch.var``). Plain
    instance normalization forgets the channel means mu_k (NCSN reports colour shifts);
    the alpha term gives them back.

    The NCSN paper (Song & Ermon 2019, Appendix A) prints
    z_k = gamma_k (x_k - mu_k) / s_k + beta_k + alpha_k (mu_k - m) / v, with alpha outside
    gamma's reach; the authors' code (ncsn and ncsnv2 repositories) scales the alpha term
    by gamma as well. This follows the code.
    """
    mu = x.mean(dim=(2, 3))                                             # (B, C)
    m = mu.mean(dim=1, keepdim=True)                                    # (B, 1)
    v = (mu.var(dim=1, keepdim=True, unbiased=True) + eps).sqrt()       # (B, 1)
    m_hat = (mu - m) / v                                                # (B, C)
    h = F.instance_norm(x, eps=eps) + (m_hat * alpha)[:, :, None, None]
    return gamma[:, :, None, None] * h + beta[:, :, None, None]


# NCSN (Song & Ermon 2019), Section 3.1 and Appendix A: conditional instance normalization++.
class CondInstanceNorm2dPlus(nn.Module):
    """Instance normalization++ with gamma, beta, alpha embedded per noise level.

    ``forward(x, idx)``: ``x`` of shape ``(B, C, H, W)``, ``idx`` of shape ``(B,)`` (long,
    the noise-level index of each sample) -> ``(B, C, H, W)``.
    """

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        self.alpha = nn.Embedding(num_classes, num_features)
        nn.init.normal_(self.gamma.weight, 1.0, 0.02)
        nn.init.normal_(self.alpha.weight, 1.0, 0.02)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        return instance_norm_plus(x, self.gamma(idx), self.beta(idx), self.alpha(idx))


# NCSNv2 (Song & Ermon 2020), Appendix B: instance normalization++ without noise conditioning.
class InstanceNorm2dPlus(nn.Module):
    """Instance normalization++ with one gamma, beta, alpha per channel.

    ``forward(x, idx=None)``: ``(B, C, H, W)`` -> ``(B, C, H, W)``; ``idx`` is ignored.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.gamma = nn.Parameter(1.0 + 0.02 * torch.randn(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.alpha = nn.Parameter(1.0 + 0.02 * torch.randn(num_features))

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        return instance_norm_plus(x, self.gamma[None], self.beta[None], self.alpha[None])


# NCSNv2 (Song & Ermon 2020), Appendix B: the RefineNet blocks of NCSNv2 are unnormalized.
class NoNorm(nn.Module):
    """The identity, called like a normalization layer: ``forward(x, idx=None) -> x``."""

    def __init__(self, num_features: int):
        super().__init__()

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        return x


# ============================================================ RefineNet (NCSN, NCSNv2)
# NCSN (Song & Ermon 2019), Appendix A: pre-activation residual block of the encoder.
class ResidualBlock(nn.Module):
    """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus a shortcut.

    ``resample=True`` marks a subsampling block: it widens in its second convolution, has a
    learned shortcut, and halves the spatial size by 2x2 mean pooling when ``dilation == 1``.
    With ``dilation > 1`` dilated convolutions replace the subsampling and the size is kept
    (NCSN: dilation enlarges the receptive field without losing resolution).
    ``(B, in_ch, H, W) -> (B, out_ch, H', W')``.
    """

    def __init__(self, in_ch: int, out_ch: int, norm: NormFactory, act: nn.Module,
                 resample: bool = False, dilation: int = 1):
        super().__init__()
        mid = in_ch if resample else out_ch
        self.norm1, self.conv1 = norm(in_ch), conv3x3(in_ch, mid, dilation)
        self.norm2, self.conv2 = norm(mid), conv3x3(mid, out_ch, dilation)
        if resample or in_ch != out_ch:
            self.shortcut = (nn.Conv2d(in_ch, out_ch, 1) if dilation == 1
                             else conv3x3(in_ch, out_ch, dilation))
        else:
            self.shortcut = nn.Identity()
        self.pool = resample and dilation == 1
        self.act = act

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        h = self.conv1(self.act(self.norm1(x, idx)))
        h = self.conv2(self.act(self.norm2(h, idx)))
        skip = self.shortcut(x)
        if self.pool:                      # convolve, then mean-pool (both paths)
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return skip + h


# RefineNet (Lin et al. 2017), Section 3.2: residual conv unit (NCSN adds normalization).
class ResidualConvUnit(nn.Module):
    """``n_blocks`` residual blocks, each ``n_stages`` of norm -> act -> conv3x3 (no bias).

    ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, n_blocks: int, n_stages: int, norm: NormFactory,
                 act: nn.Module):
        super().__init__()
        self.norms = nn.ModuleList(nn.ModuleList(norm(channels) for _ in range(n_stages))
                                   for _ in range(n_blocks))
        self.convs = nn.ModuleList(
            nn.ModuleList(conv3x3(channels, channels, bias=False) for _ in range(n_stages))
            for _ in range(n_blocks))
        self.act = act

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        for norms, convs in zip(self.norms, self.convs):
            h = x
            for norm, conv in zip(norms, convs):
                h = conv(self.act(norm(h, idx)))
            x = x + h
        return x


# RefineNet (Lin et al. 2017), Section 3.2: multi-resolution fusion.
class MultiResolutionFusion(nn.Module):
    """sum_i upsample(conv3x3(norm(x_i))) at the size of the first (finest) input.

    ``xs[i]`` of shape ``(B, in_chs[i], H_i, W_i)`` -> ``(B, channels, H_0, W_0)``.
    """

    def __init__(self, in_chs: Sequence[int], channels: int, norm: NormFactory):
        super().__init__()
        self.norms = nn.ModuleList(norm(c) for c in in_chs)
        self.convs = nn.ModuleList(conv3x3(c, channels) for c in in_chs)

    def forward(self, xs: Sequence[Tensor], idx: Tensor | None = None) -> Tensor:
        size = xs[0].shape[2:]
        out = 0
        for x, norm, conv in zip(xs, self.norms, self.convs):
            h = conv(norm(x, idx))
            out = out + F.interpolate(h, size=size, mode="bilinear", align_corners=True)
        return out


# RefineNet (Lin et al. 2017), Section 3.2: chained residual pooling. NCSN uses average
# pooling and normalization before it; NCSNv2 goes back to max pooling, unnormalized.
class ChainedResidualPooling(nn.Module):
    """x <- act(x); path <- x; n_stages times: path <- conv3x3(pool5x5(norm(path))), x <- x + path.

    ``(B, C, H, W) -> (B, C, H, W)``; ``pool`` is ``"avg"`` or ``"max"`` (5x5, stride 1).
    """

    def __init__(self, channels: int, n_stages: int, norm: NormFactory, act: nn.Module,
                 pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.norms = nn.ModuleList(norm(channels) for _ in range(n_stages))
        self.convs = nn.ModuleList(conv3x3(channels, channels, bias=False)
                                   for _ in range(n_stages))
        self.pool = nn.AvgPool2d(5, 1, 2) if pool == "avg" else nn.MaxPool2d(5, 1, 2)
        self.act = act

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        x = self.act(x)
        path = x
        for norm, conv in zip(self.norms, self.convs):
            path = conv(self.pool(norm(path, idx)))
            x = x + path
        return x


# RefineNet (Lin et al. 2017), Section 3.2 and Figure 3: one RefineNet block.
class RefineBlock(nn.Module):
    """RCU on each input -> multi-resolution fusion -> chained residual pooling -> RCU.

    ``xs[i]`` of shape ``(B, in_chs[i], H_i, W_i)``, finest first -> ``(B, channels, H_0, W_0)``.
    One input (the coarsest block of the cascade) skips the fusion; the last block
    (``end=True``) has three output RCUs instead of one.
    """

    def __init__(self, in_chs: Sequence[int], channels: int, norm: NormFactory,
                 act: nn.Module, pool: str, end: bool = False):
        super().__init__()
        if len(in_chs) == 1 and in_chs[0] != channels:
            raise ValueError(f"a one-input RefineBlock keeps its width, got {in_chs[0]} -> "
                             f"{channels} channels")
        self.adapt = nn.ModuleList(ResidualConvUnit(c, 2, 2, norm, act) for c in in_chs)
        self.fuse = MultiResolutionFusion(in_chs, channels, norm) if len(in_chs) > 1 else None
        self.crp = ChainedResidualPooling(channels, 2, norm, act, pool)
        self.out = ResidualConvUnit(channels, 3 if end else 1, 2, norm, act)

    def forward(self, xs: Sequence[Tensor], idx: Tensor | None = None) -> Tensor:
        hs = [rcu(x, idx) for rcu, x in zip(self.adapt, xs)]
        h = self.fuse(hs, idx) if self.fuse is not None else hs[0]
        return self.out(self.crp(h, idx), idx)


# Encoder stages of the RefineNets, as (width multiplier, resample, dilation) of each
# stage's first residual block. "standard": NCSN and NCSNv2 at 32-64 px; "deeper" (96-128
# px) and "deepest" (256 px): NCSNv2's larger networks (Song & Ermon 2020, Appendix B).
REFINENET_STAGES = {
    "standard": ((1, False, 1), (2, True, 1), (2, True, 2), (2, True, 4)),
    "deeper": ((1, False, 1), (2, True, 1), (2, True, 1), (4, True, 2), (4, True, 4)),
    "deepest": ((1, False, 1), (2, True, 1), (2, True, 1), (2, True, 1), (4, True, 2),
                (4, True, 4)),
}


def n_subsamplings(stages: Sequence[tuple[int, bool, int]]) -> int:
    """How many times a RefineNet with these stages halves the image (mean pooling)."""
    return sum(resample and dilation == 1 for _, resample, dilation in stages)


# NCSN (Song & Ermon 2019), Appendix A: a cascaded RefineNet with dilated convolutions.
class RefineNet(nn.Module):
    """conv3x3 -> residual stages (two blocks each) -> RefineBlocks, coarsest to finest ->
    norm -> act -> conv3x3.

    ``forward(x, idx=None)``: ``x`` of shape ``(B, C, H, W)``, ``idx`` the noise-level index
    ``(B,)`` passed to every normalization layer -> ``(B, C, H, W)``. ``norm`` normalizes the
    residual stages and the output; ``refine_norm`` the RefineBlocks.
    """

    def __init__(self, in_channels: int, ngf: int, stages: Sequence[tuple[int, bool, int]],
                 norm: NormFactory, refine_norm: NormFactory, act: nn.Module, pool: str):
        super().__init__()
        widths = [mult * ngf for mult, _, _ in stages]
        self.begin = conv3x3(in_channels, ngf)
        self.stages = nn.ModuleList()
        for (_, resample, dilation), prev, width in zip(stages, [ngf] + widths, widths):
            self.stages.append(nn.ModuleList([
                ResidualBlock(prev, width, norm, act, resample, dilation),
                ResidualBlock(width, width, norm, act, False, dilation)]))
        # refines[0] reads the coarsest stage; each later one fuses a finer stage with the
        # previous refinement and narrows to the next finer stage's width.
        n = len(stages)
        self.refines = nn.ModuleList(
            RefineBlock([widths[k]] * (1 if k == n - 1 else 2), widths[k - 1] if k else ngf,
                        refine_norm, act, pool, end=(k == 0))
            for k in reversed(range(n)))
        self.norm, self.act = norm(ngf), act
        self.end = conv3x3(ngf, in_channels)

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        h, features = self.begin(x), []
        for blocks in self.stages:
            for block in blocks:
                h = block(h, idx)
            features.append(h)
        h = self.refines[0]([features[-1]], idx)
        for refine, feature in zip(self.refines[1:], reversed(features[:-1])):
            h = refine([feature, h], idx)
        return self.end(self.act(self.norm(h, idx)))


# ============================================================ U-Net pieces
def group_norm(channels: int) -> nn.GroupNorm:
    """Group normalization with 32 groups as in DDPM, fewer for narrow layers
    (``min(32, channels // 4)``, lowered to a divisor of ``channels``)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


# Fourier features (Tancik et al. 2020) of log sigma, as NCSN++ embeds the noise level
# (Song et al. 2021, "Score-based generative modeling through SDEs").
class GaussianFourierProjection(nn.Module):
    """t -> [sin(2 pi W t), cos(2 pi W t)] with fixed W ~ N(0, scale^2): ``(B,) -> (B, dim)``.

    W is a buffer: saved with the model, never trained.
    """

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the Fourier embedding needs an even dimension, got {dim}")
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        args = t[:, None].to(self.W.dtype) * self.W[None, :] * 2 * math.pi   # score_sde's order
        return torch.cat([args.sin(), args.cos()], dim=1)


# Transformer positional encoding (Vaswani et al. 2017, Section 3.5), applied to log sigma.
class SinusoidalEmbedding(nn.Module):
    """t -> [sin(t f_j), cos(t f_j)], f_j geometric from 1 to 1/max_period: ``(B,) -> (B, dim)``."""

    def __init__(self, dim: int, max_period: float = 1e4):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the sinusoidal embedding needs an even dimension, got {dim}")
        self.dim, self.max_period = dim, max_period

    def forward(self, t: Tensor) -> Tensor:
        return sinusoidal_embedding(t, self.dim, self.max_period)


# DDPM (Ho et al. 2020, Appendix B) residual block; the noise embedding enters as a scale
# and shift after the second group norm (adaptive group normalization, Dhariwal & Nichol
# 2021, Section 3).
class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv3x3, + skip.

    ``forward(x, emb)``: ``x`` of shape ``(B, in_ch, H, W)``, ``emb`` of shape
    ``(B, emb_dim)`` -> ``(B, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), conv3x3(in_ch, out_ch)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = zero_init(conv3x3(out_ch, out_ch))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


# Self-attention over positions (non-local block, Wang et al. 2018), as DDPM uses at 16x16.
class AttentionBlock(nn.Module):
    """x + proj(softmax(q k^T / sqrt(C)) v), one head over the H*W positions.

    ``(B, C, H, W) -> (B, C, H, W)``. Written out rather than with a fused attention kernel
    so that it can be differentiated twice (sliced score matching needs that).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3)   # (B, 3, HW, C)
        q, k, v = qkv.unbind(dim=1)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(C), dim=-1)  # (B, HW, HW)
        h = (weights @ v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


# DDPM (Ho et al. 2020): downsampling by a stride-2 convolution.
class Downsample(nn.Module):
    """``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


# DDPM (Ho et al. 2020): nearest-neighbour upsampling followed by a convolution.
class Upsample(nn.Module):
    """``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def check_levels(shape, ch_mult, attn_resolutions, network: str, this: str) -> None:
    """A U-Net-shaped network's levels fit the image: ``len(ch_mult)`` levels halve it
    ``len(ch_mult) - 1`` times, and attention sits at resolutions it has. ``network`` and
    ``this`` name it in the messages ("a U-Net", "this U-Net")."""
    if not ch_mult:
        raise ValueError("ch_mult needs at least one level")
    factor = 2 ** (len(ch_mult) - 1)
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(f"{network} with {len(ch_mult)} levels halves the image "
                         f"{len(ch_mult) - 1} times: H and W must be divisible by {factor}, "
                         f"got shape {tuple(shape)}")
    heights = [shape[1] // 2 ** i for i in range(len(ch_mult))]
    unused = sorted(set(attn_resolutions) - set(heights))
    if unused:
        raise ValueError(f"attn_resolutions {unused} are not among {this}'s "
                         f"resolutions {heights} (image height {shape[1]}, ch_mult {ch_mult})")


def augment_embedding(augment_dim: int, features: int) -> nn.Linear | None:
    """EDM's ``map_augment``: a bias-free linear map of the ``augment_dim`` augmentation labels
    to the noise features, Xavier-uniform as SongUNet's (None for ``augment_dim=0``). Without
    a bias, zero labels (no augmentation, at sampling) add nothing: the non-leaky condition."""
    if augment_dim < 0:
        raise ValueError(f"augment_dim must be 0 (off) or the number of augmentation labels, "
                         f"got {augment_dim}")
    if augment_dim == 0:
        return None
    layer = nn.Linear(augment_dim, features, bias=False)
    nn.init.xavier_uniform_(layer.weight)
    return layer
