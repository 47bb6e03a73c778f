"""NCSN++ (Song et al. 2021, "Score-based generative modeling through stochastic differential
equations", Section 4.4 and Appendix H), as yang-song/score_sde_pytorch's models/ncsnpp.py
builds it for its VE configurations.

A U-Net of BigGAN residual blocks with FIR resampling (StyleGAN2's [1, 3, 3, 1] kernel),
skip connections rescaled by 1/sqrt(2), and an input (and optionally output) pyramid; the
noise level enters as Fourier features of log sigma through a two-layer MLP, and the output
is divided by sigma.

Called as ``net(x, sigma)``: ``x`` of shape ``(B, C, H, W)``, ``sigma`` of shape ``(B,)``.
With ``embedding_type="fourier"`` any positive sigma works (score_sde's continuous VE
training feeds sigma itself: ``used_sigmas = time_cond``); with ``"positional"`` (its
discrete SMLD training) sigma is looked up in the table the network was built with and the
network embeds the entry's index. :func:`from_score_sde` maps score_sde's state dict onto
this network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncsn.nets.layers import (GaussianFourierProjection, augment_embedding, check_levels,
                              group_norm)
from ncsn.noise import sigma_index


@dataclass
class NCSNppConfig:
    name: str = "ncsnpp"
    nf: int = 128                    # width of the first level
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 2])   # level widths / nf
    num_res_blocks: int = 4          # residual blocks per level on the way down (8: deep)
    attn_resolutions: List[int] = field(default_factory=lambda: [16])  # heights with attention
    dropout: float = 0.1
    resamp_with_conv: bool = True    # resampling layers (resblock_type=ddpm) convolve
    fir: bool = True                 # FIR resampling (StyleGAN2) instead of nearest / mean
    fir_kernel: List[int] = field(default_factory=lambda: [1, 3, 3, 1])
    skip_rescale: bool = True        # residual sums divided by sqrt(2)
    resblock_type: str = "biggan"    # biggan | ddpm
    progressive: str = "none"        # output pyramid: none | output_skip | residual
    progressive_input: str = "residual"   # input pyramid: none | input_skip | residual
    progressive_combine: str = "sum"      # input_skip's merge: sum | cat
    fourier_scale: float = 16.0      # std of the Fourier frequencies of log sigma
    init_scale: float = 0.0          # of the last conv of each branch (0: the code's 1e-10)
    embedding_type: str = "fourier"  # fourier (of log sigma) | positional (of the table index)
    scale_by_sigma: bool = True      # divide the output by sigma
    centered: bool = False           # data already in [-1, 1]; false: 2x - 1 inside
    augment_dim: int = 0             # EDM's augmentation labels embedded (9 with loss.augment_p
                                     # > 0); 0: none
    precond: str = "none"            # none | edm | ve: NVlabs/edm's EDMPrecond or VEPrecond around
                                     # the network (ncsn/nets/precond.py)
    sigma_data: float = 0.5          # precond=edm: the data's standard deviation (EDM's sigma_data)


# ============================================================ initialisation and layers
def default_init_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """DDPM's initialisation (score_sde's ``default_init``): variance scaling with fan_avg,
    uniform, i.e. U(+-sqrt(3 scale / fan_avg)) -- Xavier uniform with gain sqrt(scale).
    ``scale=0`` means 1e-10, as the code has it (a branch that starts almost at zero)."""
    scale = 1e-10 if scale == 0 else scale
    return nn.init.xavier_uniform_(weight, gain=math.sqrt(scale))


def conv2d(in_ch: int, out_ch: int, kernel: int = 3, init_scale: float = 1.0,
           stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    """A convolution with DDPM's initialisation and zero bias; 3x3 keeps the size."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride,
                     padding=kernel // 2 if padding is None else padding)
    default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    default_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def skip_sum(x: Tensor, h: Tensor, rescale: bool) -> Tensor:
    """x + h, divided by sqrt(2) when ``rescale`` (keeps the variance of two unit sums)."""
    return (x + h) / math.sqrt(2.0) if rescale else x + h


def timestep_embedding(t: Tensor, dim: int, max_positions: int = 10000) -> Tensor:
    """DDPM's sinusoidal embedding (Ho et al. 2020; Vaswani et al. 2017, Section 3.5) of a
    noise-level index: frequencies max_positions^(-j / (dim/2 - 1)). ``(B,) -> (B, dim)``."""
    half = dim // 2
    step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -step)
    args = t.float()[:, None] * freqs[None, :]
    return F.pad(torch.cat([args.sin(), args.cos()], dim=1), (0, dim % 2))


# ============================================================ FIR resampling (StyleGAN2)
def fir_filter(taps: Sequence[float]) -> Tensor:
    """The separable 2-D FIR filter outer(k, k), normalised to sum 1 (StyleGAN2, Karras et
    al. 2020): a constant image keeps its value."""
    k = torch.as_tensor(taps, dtype=torch.float32)
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by inserting ``up - 1`` zeros after each pixel, pad ``pad`` (before, after)
    on both axes, convolve each channel with ``kernel``, keep every ``down``-th pixel:
    StyleGAN2's upfirdn2d in plain torch (twice differentiable).
    ``(B, C, H, W) -> (B, C, (H up + pad0 + pad1 - k) // down + 1, ...)``."""
    B, C, H, W = x.shape
    if up > 1:
        x = F.pad(x[:, :, :, None, :, None], (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(B, C, H * up, W * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = kernel.flip(0, 1).to(x.dtype).expand(C, 1, *kernel.shape)  # a convolution,
    return F.conv2d(x, weight, stride=down, groups=C)                  # not a correlation


def upsample2(x: Tensor, kernel: Tensor | None) -> Tensor:
    """2x upsampling with the FIR filter ``kernel`` (gain 4, for the inserted zeros), or
    nearest-neighbour when ``kernel`` is None. ``(B, C, H, W) -> (B, C, 2H, 2W)``."""
    if kernel is None:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    p = kernel.shape[0] - 2
    return upfirdn2d(x, 4 * kernel, up=2, pad=((p + 1) // 2 + 1, p // 2))


def downsample2(x: Tensor, kernel: Tensor | None) -> Tensor:
    """2x downsampling with the FIR filter ``kernel``, or the 2x2 mean when ``kernel`` is
    None. ``(B, C, H, W) -> (B, C, H/2, W/2)``."""
    if kernel is None:
        return F.avg_pool2d(x, 2)
    p = kernel.shape[0] - 2
    return upfirdn2d(x, kernel, down=2, pad=((p + 1) // 2, p // 2))


class _Resampler(nn.Module):
    """A module that resamples by 2: ``self.kernel`` is its FIR filter (``fir``), or None
    for nearest / mean. The filter is a buffer that follows the module's device and stays
    out of the state dict."""

    def __init__(self, fir: bool, taps: Sequence[float]):
        super().__init__()
        self.fir = fir
        self.register_buffer("_kernel", fir_filter(taps), persistent=False)

    @property
    def kernel(self) -> Tensor | None:
        return self._kernel if self.fir else None


# StyleGAN2 (Karras et al. 2020), Appendix B: resampling fused into a 3x3 convolution.
class FIRConv2d(_Resampler):
    """3x3 convolution with FIR upsampling (a stride-2 transposed convolution, then the
    filter) or downsampling (the filter, then a stride-2 convolution) by 2.

    ``(B, in_ch, H, W) -> (B, out_ch, 2H, 2W)`` (``up``) or ``(B, out_ch, H/2, W/2)``.
    score_sde_pytorch's port of the upsampling path flips the kernel by slicing with a
    negative step, which torch refuses: that path cannot run there. This computes what it
    means (StyleGAN2's upsample_conv_2d).
    """

    def __init__(self, in_ch: int, out_ch: int, up: bool, taps: Sequence[float]):
        super().__init__(True, taps)
        self.weight = nn.Parameter(default_init_(torch.empty(out_ch, in_ch, 3, 3)))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.up = up

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel
        if self.up:
            weight = self.weight.flip(2, 3).transpose(0, 1)        # (in, out, 3, 3)
            x = F.conv_transpose2d(x, weight, stride=2)            # (2H + 1, 2W + 1)
            p = k.shape[0] - 4
            x = upfirdn2d(x, 4 * k, pad=((p + 1) // 2 + 1, p // 2 + 1))
        else:
            p = k.shape[0]
            x = F.conv2d(upfirdn2d(x, k, pad=((p + 1) // 2, p // 2)), self.weight, stride=2)
        return x + self.bias[None, :, None, None]


class Upsample(_Resampler):
    """2x upsampling, FIR or nearest, optionally with a convolution (score_sde's
    layerspp.Upsample). ``(B, in_ch, H, W) -> (B, out_ch, 2H, 2W)``."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False,
                 fir: bool = False, taps: Sequence[float] = (1, 3, 3, 1)):
        super().__init__(fir, taps)
        out_ch = out_ch or in_ch
        if with_conv:
            self.conv = FIRConv2d(in_ch, out_ch, True, taps) if fir else conv2d(in_ch, out_ch)
        self.with_conv = with_conv

    def forward(self, x: Tensor) -> Tensor:
        if self.fir and self.with_conv:
            return self.conv(x)
        h = upsample2(x, self.kernel)
        return self.conv(h) if self.with_conv else h


class Downsample(_Resampler):
    """2x downsampling, FIR or by a stride-2 convolution (the 2x2 mean without one)
    (score_sde's layerspp.Downsample). ``(B, in_ch, H, W) -> (B, out_ch, H/2, W/2)``."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False,
                 fir: bool = False, taps: Sequence[float] = (1, 3, 3, 1)):
        super().__init__(fir, taps)
        out_ch = out_ch or in_ch
        if with_conv:
            self.conv = (FIRConv2d(in_ch, out_ch, False, taps) if fir
                         else conv2d(in_ch, out_ch, stride=2, padding=0))
        self.with_conv = with_conv

    def forward(self, x: Tensor) -> Tensor:
        if not self.with_conv:
            return downsample2(x, self.kernel)
        if self.fir:
            return self.conv(x)
        return self.conv(F.pad(x, (0, 1, 0, 1)))       # pad right and bottom: TF's "SAME"


# ============================================================ blocks
def _emb_bias(proj: nn.Linear, emb: Tensor) -> Tensor:
    """The noise embedding as a per-channel bias: ``(B, emb_dim) -> (B, C, 1, 1)``."""
    return proj(F.silu(emb))[:, :, None, None]


# BigGAN (Brock et al. 2019), Figure 15(b): a residual block that resamples inside, here
# with group norm, the noise embedding added after the first convolution (DDPM) and the sum
# divided by sqrt(2) (NCSN++, Song et al. 2021, Appendix H).
class BigGANResBlock(_Resampler):
    """GN -> SiLU -> [resample] -> conv3x3 -> + Dense(SiLU(emb)) -> GN -> SiLU -> dropout ->
    conv3x3, plus the input (resampled, and 1x1-projected when the shape changes).

    ``forward(x, emb)``: ``(B, in_ch, H, W)``, ``(B, emb_dim)`` -> ``(B, out_ch, H', W')``.
    """

    def __init__(self, in_ch: int, out_ch: int | None, emb_dim: int, up: bool = False,
                 down: bool = False, dropout: float = 0.1, fir: bool = False,
                 taps: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True,
                 init_scale: float = 0.0):
        super().__init__(fir, taps)
        out_ch = out_ch or in_ch
        self.norm1, self.conv1 = group_norm(in_ch), conv2d(in_ch, out_ch)
        self.emb_proj = linear(emb_dim, out_ch)
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = conv2d(out_ch, out_ch, init_scale=init_scale)
        self.skip = conv2d(in_ch, out_ch, 1) if in_ch != out_ch or up or down else None
        self.up, self.down, self.skip_rescale = up, down, skip_rescale

    def resample(self, x: Tensor) -> Tensor:
        if self.up:
            return upsample2(x, self.kernel)
        return downsample2(x, self.kernel) if self.down else x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self.resample(F.silu(self.norm1(x)))) + _emb_bias(self.emb_proj, emb)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        x = self.resample(x)
        return skip_sum(self.skip(x) if self.skip is not None else x, h, self.skip_rescale)


# DDPM (Ho et al. 2020), Appendix B: the residual block, with NCSN++'s optional 1/sqrt(2).
class DDPMResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> + Dense(SiLU(emb)) -> GN -> SiLU -> dropout -> conv3x3,
    plus the input (1x1-projected when the width changes).

    ``forward(x, emb)``: ``(B, in_ch, H, W)``, ``(B, emb_dim)`` -> ``(B, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int | None, emb_dim: int, dropout: float = 0.1,
                 skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm1, self.conv1 = group_norm(in_ch), conv2d(in_ch, out_ch)
        self.emb_proj = linear(emb_dim, out_ch)
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = conv2d(out_ch, out_ch, init_scale=init_scale)
        # score_sde's NIN layer: a 1x1 convolution, initialised at scale 0.1
        self.skip = conv2d(in_ch, out_ch, 1, init_scale=0.1) if in_ch != out_ch else None
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + _emb_bias(self.emb_proj, emb)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return skip_sum(self.skip(x) if self.skip is not None else x, h, self.skip_rescale)


# Self-attention over positions (non-local block, Wang et al. 2018) as DDPM places it, with
# NCSN++'s optional 1/sqrt(2) on the residual sum.
class SelfAttention(nn.Module):
    """x + proj(v softmax(q^T k / sqrt(C))), one head over the H*W positions.

    ``(B, C, H, W) -> (B, C, H, W)``. q, k, v start at scale 0.1 and proj at ``init_scale``,
    as score_sde's NIN layers do. Written out (no fused kernel): twice differentiable.
    """

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = conv2d(channels, channels, 1, init_scale=0.1)
        self.k = conv2d(channels, channels, 1, init_scale=0.1)
        self.v = conv2d(channels, channels, 1, init_scale=0.1)
        self.proj = conv2d(channels, channels, 1, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(B, C, H * W) for f in (self.q, self.k, self.v))
        weights = torch.softmax(q.transpose(1, 2) @ k * C ** -0.5, dim=-1)   # (B, HW, HW)
        h = (v @ weights.transpose(1, 2)).reshape(B, C, H, W)
        return skip_sum(x, self.proj(h), self.skip_rescale)


class Combine(nn.Module):
    """input_skip's merge: a 1x1 convolution of the downsampled image, summed with or
    concatenated before the features (score_sde's layerspp.Combine).
    ``(B, C_img, H, W), (B, C, H, W) -> (B, C or 2C, H, W)``."""

    def __init__(self, image_ch: int, channels: int, method: str = "sum"):
        super().__init__()
        self.conv, self.method = conv2d(image_ch, channels, 1), method

    def forward(self, image: Tensor, h: Tensor) -> Tensor:
        projected = self.conv(image)
        return projected + h if self.method == "sum" else torch.cat([projected, h], dim=1)


# ============================================================ the network
@dataclass
class _Parts:
    """Builds the layers of one NCSN++ with its settings (score_sde's functools.partial's)."""
    nf: int
    image_ch: int
    dropout: float
    resamp_with_conv: bool
    fir: bool
    taps: List[int]
    skip_rescale: bool
    init_scale: float
    biggan: bool

    def block(self, in_ch: int, out_ch: int | None = None, up: bool = False,
              down: bool = False) -> nn.Module:
        if self.biggan:
            return BigGANResBlock(in_ch, out_ch, 4 * self.nf, up, down, self.dropout, self.fir,
                                  self.taps, self.skip_rescale, self.init_scale)
        return DDPMResBlock(in_ch, out_ch, 4 * self.nf, self.dropout, self.skip_rescale,
                            self.init_scale)

    def attn(self, channels: int) -> SelfAttention:
        return SelfAttention(channels, self.skip_rescale, self.init_scale)

    def downsample(self, channels: int) -> nn.Module:
        if self.biggan:
            return self.block(channels, down=True)
        return Downsample(channels, with_conv=self.resamp_with_conv, fir=self.fir,
                          taps=self.taps)

    def upsample(self, channels: int) -> nn.Module:
        if self.biggan:
            return self.block(channels, up=True)
        return Upsample(channels, with_conv=self.resamp_with_conv, fir=self.fir, taps=self.taps)


class _DownLevel(nn.Module):
    """One resolution on the way down: residual blocks, each followed by attention (or
    nothing), then, but at the coarsest level, a downsampling and the input pyramid's step
    (``pyramid``: a Combine for input_skip, a downsampling convolution for residual)."""

    def __init__(self, blocks: List[nn.Module], attns: List[nn.Module],
                 down: nn.Module | None, pyramid: nn.Module | None):
        super().__init__()
        self.blocks, self.attns = nn.ModuleList(blocks), nn.ModuleList(attns)
        self.down, self.pyramid = down, pyramid


class _UpLevel(nn.Module):
    """One resolution on the way up: residual blocks (each eats one skip tensor), one
    attention or none, the output pyramid's step (``pyramid_norm`` and ``pyramid_conv``:
    output_skip's image of this level, or residual's start at the coarsest level;
    ``pyramid_up``: residual's upsampling convolution), then, but at the finest level, an
    upsampling."""

    def __init__(self, blocks: List[nn.Module], attn: nn.Module | None,
                 pyramid_norm: nn.Module | None, pyramid_conv: nn.Module | None,
                 pyramid_up: nn.Module | None, up: nn.Module | None):
        super().__init__()
        self.blocks, self.attn = nn.ModuleList(blocks), attn
        self.pyramid_norm, self.pyramid_conv = pyramid_norm, pyramid_conv
        self.pyramid_up, self.up = pyramid_up, up


# NCSN++ (Song et al. 2021, Appendix H): score_sde's models/ncsnpp.py, layer for layer.
class NCSNpp(_Resampler):
    """NCSN++ score network s_theta(x, sigma).

    Args:
        shape: ``(C, H, W)`` of one sample; H and W divisible by ``2 ** (len(ch_mult) - 1)``.
        sigmas: the noise table, largest first; kept (as a buffer) only with
            ``embedding_type="positional"``, which embeds each sigma's index in it.
        nf: width of the first level; the noise embedding has ``4 nf`` features.
        ch_mult: one entry per resolution, the level's width in units of ``nf``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: heights at which self-attention follows each residual block on
            the way down, and the level's last block on the way up; the middle always has one.
        dropout: dropout rate inside the residual blocks.
        resamp_with_conv: the resampling layers of ``resblock_type="ddpm"`` convolve.
        fir, fir_kernel: resample with this FIR filter (StyleGAN2), else nearest / 2x2 mean.
        skip_rescale: divide every residual and pyramid sum by sqrt(2).
        resblock_type: ``"biggan"`` (resampling inside residual blocks) or ``"ddpm"``
            (residual blocks, and separate resampling layers).
        progressive: the output pyramid: ``"none"``; ``"output_skip"``, each level adds its
            own image to the upsampled sum of the coarser ones; ``"residual"``, features
            upsampled by convolutions and summed.
        progressive_input: the input pyramid: ``"none"``; ``"input_skip"``, the image,
            downsampled, merged in at every level; ``"residual"``, a downsampling
            convolution of the pyramid summed with the features.
        progressive_combine: how ``input_skip`` merges: ``"sum"`` or ``"cat"``.
        fourier_scale: standard deviation of the Fourier frequencies of log sigma.
        init_scale: initial scale of the last layer of every residual branch and of the
            output (0: the code's 1e-10, so that the network starts at almost zero).
        embedding_type: ``"fourier"`` (of log sigma: any sigma) or ``"positional"`` (DDPM's
            sinusoids of sigma's index in ``sigmas``: the table's levels only).
        scale_by_sigma: divide the output by sigma (NCSNv2, Technique 3).
        centered: the data is in [-1, 1] already; ``False``: the network sees 2x - 1.
        augment_dim: EDM's augmentation labels (:mod:`ncsn.augment`; 0: none). A bias-free
            linear map of them (SongUNet's ``map_augment``) is added to the noise features
            before the MLP; ``forward``'s ``augment_labels`` ``(B, augment_dim)`` are given in
            training only, and absent (zero: no augmentation) when sampling.

    score_sde's ``model.conv_size`` and ``model.attention_type`` are read by none of its
    networks; its NCSN++ configurations all use swish (SiLU), as here.
    """

    def __init__(self, shape: tuple[int, int, int], sigmas: Tensor | None = None,
                 nf: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 resamp_with_conv: bool = True, fir: bool = True,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1), skip_rescale: bool = True,
                 resblock_type: str = "biggan", progressive: str = "none",
                 progressive_input: str = "residual", progressive_combine: str = "sum",
                 fourier_scale: float = 16.0, init_scale: float = 0.0,
                 embedding_type: str = "fourier", scale_by_sigma: bool = True,
                 centered: bool = False, augment_dim: int = 0):
        super().__init__(fir, fir_kernel)
        ch_mult, attn = list(ch_mult), set(attn_resolutions)
        _check_arguments(shape, ch_mult, attn, resblock_type, progressive, progressive_input,
                         progressive_combine, embedding_type, sigmas)
        self.nf, self.embedding_type, self.progressive = nf, embedding_type, progressive
        self.progressive_input, self.skip_rescale = progressive_input, skip_rescale
        self.biggan, self.scale_by_sigma, self.centered = (resblock_type == "biggan",
                                                           scale_by_sigma, centered)
        if embedding_type == "positional":
            self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32).clone())
        self.fourier = (GaussianFourierProjection(2 * nf, fourier_scale)
                        if embedding_type == "fourier" else None)
        embed_dim = 2 * nf if self.fourier is not None else nf
        self.embed = nn.Sequential(linear(embed_dim, 4 * nf), nn.SiLU(), linear(4 * nf, 4 * nf))
        parts = _Parts(nf, shape[0], dropout, resamp_with_conv, fir, list(fir_kernel),
                       skip_rescale, init_scale, self.biggan)
        heights = [shape[1] // 2 ** i for i in range(len(ch_mult))]
        self.conv_in = conv2d(shape[0], nf)
        self.down, skip_chs = _down_path(parts, ch_mult, num_res_blocks, heights, attn,
                                         progressive_input, progressive_combine)
        width = skip_chs[-1]
        self.mid_block1, self.mid_attn = parts.block(width), parts.attn(width)
        self.mid_block2 = parts.block(width)
        self.up, width = _up_path(parts, ch_mult, num_res_blocks, heights, attn, progressive,
                                  skip_chs)
        if progressive != "output_skip":
            self.norm_out = group_norm(width)
            self.conv_out = conv2d(width, shape[0], init_scale=init_scale)
        # last, so that the other weights are drawn as without it
        self.map_augment = augment_embedding(augment_dim, embed_dim)

    def forward(self, x: Tensor, sigma: Tensor, augment_labels: Tensor | None = None) -> Tensor:
        """``x`` of shape ``(B, C, H, W)``, ``sigma`` of shape ``(B,)``, ``augment_labels``
        ``(B, augment_dim)`` or None (no augmentation) -> ``(B, C, H, W)``."""
        emb, sigma = self._embed(sigma, augment_labels)                     # (B, 4 nf)
        if not self.centered:
            x = 2 * x - 1                                                   # [0, 1] -> [-1, 1]
        hs = self._encode(x, emb)
        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], emb)), emb)
        h = self._decode(h, hs, emb)
        return h / sigma.to(h.dtype)[:, None, None, None] if self.scale_by_sigma else h

    def _embed(self, sigma: Tensor, augment_labels: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
        """The noise embedding ``(B, 4 nf)``, and the sigma to divide the output by (with
        the positional embedding: the table's level)."""
        if self.fourier is not None:
            features = self.fourier(sigma.log())
        else:
            index = sigma_index(sigma, self.sigmas)
            features, sigma = timestep_embedding(index, self.nf), self.sigmas[index]
        if self.map_augment is not None and augment_labels is not None:
            # EDM (SongUNet): the augmentation labels' embedding joins the noise features
            features = features + self.map_augment(augment_labels.to(features.dtype))
        return self.embed(features), sigma

    def _resample(self, module: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        return module(h, emb) if self.biggan else module(h)

    def _encode(self, x: Tensor, emb: Tensor) -> List[Tensor]:
        """Every skip tensor of the way down, the coarsest last."""
        image, hs = x, [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                hs.append(attn(block(hs[-1], emb)))
            if level.down is None:
                continue
            h = self._resample(level.down, hs[-1], emb)
            if self.progressive_input == "input_skip":
                image = downsample2(image, self.kernel)
                h = level.pyramid(image, h)
            elif self.progressive_input == "residual":
                image = h = skip_sum(level.pyramid(image), h, self.skip_rescale)
            hs.append(h)
        return hs

    def _decode(self, h: Tensor, hs: List[Tensor], emb: Tensor) -> Tensor:
        pyramid = None
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if level.attn is not None:
                h = level.attn(h)
            if level.pyramid_conv is not None:     # output_skip's image; residual's start
                image = level.pyramid_conv(F.silu(level.pyramid_norm(h)))
                pyramid = image if pyramid is None else upsample2(pyramid, self.kernel) + image
            elif level.pyramid_up is not None:     # residual: the features take the sum
                pyramid = h = skip_sum(level.pyramid_up(pyramid), h, self.skip_rescale)
            if level.up is not None:
                h = self._resample(level.up, h, emb)
        if self.progressive == "output_skip":
            return pyramid
        return self.conv_out(F.silu(self.norm_out(h)))


def _check_arguments(shape, ch_mult, attn, resblock_type, progressive, progressive_input,
                     progressive_combine, embedding_type, sigmas) -> None:
    for name, value, choices in [
            ("resblock_type", resblock_type, ("biggan", "ddpm")),
            ("progressive", progressive, ("none", "output_skip", "residual")),
            ("progressive_input", progressive_input, ("none", "input_skip", "residual")),
            ("progressive_combine", progressive_combine, ("sum", "cat")),
            ("embedding_type", embedding_type, ("fourier", "positional"))]:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if embedding_type == "positional" and sigmas is None:
        raise ValueError("embedding_type='positional' embeds sigma's index: it needs sigmas")
    check_levels(shape, ch_mult, attn, "NCSN++", "this network")


def _down_path(parts: _Parts, ch_mult: List[int], num_res_blocks: int, heights: List[int],
               attn: set, progressive_input: str,
               combine: str) -> tuple[nn.ModuleList, List[int]]:
    """The levels from the finest resolution down, and the width of every skip tensor."""
    levels, width, image_ch = nn.ModuleList(), parts.nf, parts.image_ch
    skip_chs = [width]
    for i, mult in enumerate(ch_mult):
        blocks, attns = [], []
        for _ in range(num_res_blocks):
            blocks.append(parts.block(width, parts.nf * mult))
            width = parts.nf * mult
            attns.append(parts.attn(width) if heights[i] in attn else nn.Identity())
            skip_chs.append(width)
        down = pyramid = None
        if i < len(ch_mult) - 1:
            down = parts.downsample(width)
            if progressive_input == "input_skip":
                pyramid = Combine(image_ch, width, combine)
                width *= 2 if combine == "cat" else 1
            elif progressive_input == "residual":
                pyramid = Downsample(image_ch, width, with_conv=True, fir=parts.fir,
                                     taps=parts.taps)
                image_ch = width
            skip_chs.append(width)
        levels.append(_DownLevel(blocks, attns, down, pyramid))
    return levels, skip_chs


def _up_path(parts: _Parts, ch_mult: List[int], num_res_blocks: int, heights: List[int],
             attn: set, progressive: str, skip_chs: List[int]) -> tuple[nn.ModuleList, int]:
    """The levels from the coarsest resolution up, and the width of the last one."""
    levels, skip_chs, width = nn.ModuleList(), list(skip_chs), skip_chs[-1]
    for i in reversed(range(len(ch_mult))):
        blocks = []
        for _ in range(num_res_blocks + 1):
            blocks.append(parts.block(width + skip_chs.pop(), parts.nf * ch_mult[i]))
            width = parts.nf * ch_mult[i]
        norm = conv = pyramid_up = None
        if progressive == "output_skip":
            norm, conv = group_norm(width), conv2d(width, parts.image_ch,
                                                   init_scale=parts.init_scale)
        elif progressive == "residual" and i == len(ch_mult) - 1:
            norm, conv = group_norm(width), conv2d(width, width)
        elif progressive == "residual":
            pyramid_up = Upsample(parts.nf * ch_mult[i + 1], width, with_conv=True,
                                  fir=parts.fir, taps=parts.taps)
        levels.append(_UpLevel(blocks, parts.attn(width) if heights[i] in attn else None,
                               norm, conv, pyramid_up, parts.upsample(width) if i else None))
    return levels, width


# ============================================================ score_sde's state dict
def score_sde_modules(net: NCSNpp) -> List[nn.Module]:
    """This network's layers in the order in which score_sde's NCSNpp appends them to its
    ``all_modules`` list: layer i here is ``all_modules.i`` there."""
    order = [m for m in (net.fourier, net.embed[0], net.embed[2], net.conv_in) if m is not None]
    for level in net.down:
        for block, attn in zip(level.blocks, level.attns):
            order += [block] + ([] if isinstance(attn, nn.Identity) else [attn])
        order += [m for m in (level.down, level.pyramid) if m is not None]
    order += [net.mid_block1, net.mid_attn, net.mid_block2]
    for level in net.up:
        order += [*level.blocks]
        order += [m for m in (level.attn, level.pyramid_norm, level.pyramid_conv,
                              level.pyramid_up, level.up) if m is not None]
    if net.progressive != "output_skip":
        order += [net.norm_out, net.conv_out]
    return order


_RESBLOCK_NAMES = {"norm1": "GroupNorm_0", "conv1": "Conv_0", "emb_proj": "Dense_0",
                   "norm2": "GroupNorm_1", "conv2": "Conv_1"}


def _their_layer_names(module: nn.Module) -> dict:
    """Our sub-layer names -> score_sde's, within one of its ``all_modules`` entries."""
    if isinstance(module, BigGANResBlock):
        return {**_RESBLOCK_NAMES, "skip": "Conv_2"}
    if isinstance(module, DDPMResBlock):
        return {**_RESBLOCK_NAMES, "skip": "NIN_0"}
    if isinstance(module, SelfAttention):
        return {"norm": "GroupNorm_0", "q": "NIN_0", "k": "NIN_1", "v": "NIN_2", "proj": "NIN_3"}
    if isinstance(module, Combine):
        return {"conv": "Conv_0"}
    if isinstance(module, (Upsample, Downsample)):
        return {"conv": "Conv2d_0" if module.fir else "Conv_0"}
    return {}                                   # a torch layer: the same names


def _their_name(module: nn.Module, name: str) -> str:
    layer, _, tensor = name.partition(".")
    theirs = _their_layer_names(module).get(layer)
    if theirs is None:
        return name
    if theirs.startswith("NIN_"):               # score_sde's 1x1 layer: W (in, out) and b
        tensor = {"weight": "W", "bias": "b"}[tensor]
    return f"{theirs}.{tensor}"


def score_sde_keys(net: NCSNpp) -> dict[str, str]:
    """score_sde's state-dict key -> ours, for every entry of this network's state dict, in
    score_sde's order (its ``sigmas`` buffer first, then ``all_modules.0``, ...): zipped with
    the parameters that require a gradient, this order also reads its EMA's shadow list."""
    state, prefixes = net.state_dict(), {m: name for name, m in net.named_modules()}
    keys = {"sigmas": "sigmas"} if "sigmas" in state else {}
    for i, module in enumerate(score_sde_modules(net)):
        prefix = prefixes[module] + "."
        for ours in (k for k in state if k.startswith(prefix)):
            keys[f"all_modules.{i}.{_their_name(module, ours[len(prefix):])}"] = ours
    return keys


def from_score_sde(state_dict: dict, net: NCSNpp) -> dict[str, Tensor]:
    """score_sde's NCSNpp state dict (DataParallel's ``module.`` prefixes allowed) as a state
    dict of ``net``, built with the same configuration: ``net.load_state_dict(...)`` takes it.
    Its 1x1 NIN weights ``(in, out)`` become 1x1 convolutions ``(out, in, 1, 1)``; its sigma
    table is dropped unless ``net`` embeds positions. A missing or unexpected key, or a
    shape that differs, raises ValueError naming it."""
    theirs = {k.removeprefix("module."): v for k, v in state_dict.items()}
    keys, ours = score_sde_keys(net), net.state_dict()
    missing = [k for k in keys if k not in theirs]
    unexpected = [k for k in theirs if k not in keys and k != "sigmas"]
    if missing or unexpected:
        raise ValueError(f"not score_sde's NCSNpp of this configuration: missing keys "
                         f"{missing[:5]}, unexpected keys {unexpected[:5]}")
    converted = {}
    for their_key, our_key in keys.items():
        value = theirs[their_key]
        layer, _, tensor = their_key.rpartition(".")
        if layer.rpartition(".")[2].startswith("NIN_") and tensor == "W":
            value = value.t()[:, :, None, None]
        if value.shape != ours[our_key].shape:
            raise ValueError(f"{their_key}: shape {tuple(value.shape)}, but {our_key} here "
                             f"has {tuple(ours[our_key].shape)}")
        converted[our_key] = value
    return converted
