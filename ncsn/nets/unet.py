"""A U-Net score network conditioned on sigma (DDPM's U-Net, Ho et al. 2020, with NCSN++'s
embedding of log sigma, Song et al. 2021).

Called as ``net(x, sigma)``: ``x`` of shape ``(B, C, H, W)``, ``sigma`` of shape ``(B,)``,
any positive values. log sigma is embedded (Gaussian Fourier or sinusoidal features, then an
MLP) and reaches every residual block as a scale and a shift. The output has ``x``'s shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncsn.nets.layers import (AttentionBlock, Downsample, GaussianFourierProjection, ResBlock,
                              SinusoidalEmbedding, Upsample, augment_embedding, check_levels,
                              conv3x3, group_norm, zero_init)


@dataclass
class UNetConfig:
    name: str = "unet"
    ch: int = 128                    # width of the first level
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 2])   # level widths / ch
    num_res_blocks: int = 2          # residual blocks per level on the way down
    attn_resolutions: List[int] = field(default_factory=lambda: [16])  # heights with attention
    dropout: float = 0.1
    embedding: str = "fourier"       # fourier | sinusoidal, of log sigma
    fourier_scale: float = 16.0      # std of the Fourier frequencies (NCSN++)
    scale_by_sigma: bool = True      # divide the output by sigma (NCSNv2, Technique 3)
    augment_dim: int = 0             # EDM's augmentation labels embedded (9 with loss.augment_p
                                     # > 0); 0: none
    precond: str = "none"            # none | edm | ve: NVlabs/edm's EDMPrecond or VEPrecond around
                                     # the network (ncsn/nets/precond.py)
    sigma_data: float = 0.5          # precond=edm: the data's standard deviation (EDM's sigma_data)


class _Level(nn.Module):
    """One resolution of the U-Net: residual blocks, each followed by attention or nothing,
    then an optional resampling."""

    def __init__(self, blocks: List[nn.Module], attns: List[nn.Module],
                 resample: nn.Module | None):
        super().__init__()
        self.blocks, self.attns = nn.ModuleList(blocks), nn.ModuleList(attns)
        self.resample = resample


# DDPM (Ho et al. 2020), Appendix B: the U-Net (a PixelCNN++ backbone with group norm and
# self-attention), here fed the embedding of log sigma in place of the timestep.
class UNet(nn.Module):
    """U-Net score network s_theta(x, sigma).

    Args:
        shape: ``(C, H, W)`` of one sample; H and W divisible by ``2 ** (len(ch_mult) - 1)``.
        sigmas: the noise table; unused (the network conditions on sigma's value), accepted
            so that every image network is built as ``Net(shape, sigmas, ...)``.
        ch: width of the first level; the embedding of log sigma has ``ch`` features and
            the MLP after it ``4 ch``.
        ch_mult: one entry per resolution, the level's width in units of ``ch``; each level
            but the last halves the resolution.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: heights (in pixels) at which self-attention follows each residual
            block; the middle of the network always has one.
        dropout: dropout rate inside the residual blocks.
        embedding: ``"fourier"`` (random Fourier features, NCSN++) or ``"sinusoidal"``
            (Transformer positional encoding), both of log sigma.
        fourier_scale: standard deviation of the Fourier frequencies.
        scale_by_sigma: divide the output by sigma (NCSNv2, Technique 3).
        augment_dim: EDM's augmentation labels (:mod:`ncsn.augment`; 0: none), embedded as
            NCSN++'s (a bias-free linear map added to the features of log sigma).
    """

    def __init__(self, shape: tuple[int, int, int], sigmas: Tensor | None = None,
                 ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 embedding: str = "fourier", fourier_scale: float = 16.0,
                 scale_by_sigma: bool = True, augment_dim: int = 0):
        super().__init__()
        ch_mult, attn_resolutions = list(ch_mult), list(attn_resolutions)
        _check_arguments(shape, ch_mult, attn_resolutions, embedding)
        self.scale_by_sigma = scale_by_sigma
        self.embed = nn.Sequential(_noise_embedding(embedding, ch, fourier_scale),
                                   nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.conv_in = conv3x3(shape[0], ch)
        args = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                    attn=set(attn_resolutions), height=shape[1], dropout=dropout)
        self.down, skip_chs = _down_path(**args)
        width = ch * ch_mult[-1]
        self.mid_block1 = ResBlock(width, width, 4 * ch, dropout)
        self.mid_attn = AttentionBlock(width)
        self.mid_block2 = ResBlock(width, width, 4 * ch, dropout)
        self.up = _up_path(**args, skip_chs=skip_chs)
        self.norm_out = group_norm(ch * ch_mult[0])
        self.conv_out = zero_init(conv3x3(ch * ch_mult[0], shape[0]))
        self.map_augment = augment_embedding(augment_dim, ch)     # last: other weights as without

    def forward(self, x: Tensor, sigma: Tensor, augment_labels: Tensor | None = None) -> Tensor:
        """``x`` of shape ``(B, C, H, W)``, ``sigma`` of shape ``(B,)``, ``augment_labels``
        ``(B, augment_dim)`` or None (no augmentation) -> ``(B, C, H, W)``."""
        features = self.embed[0](sigma.log())                       # (B, ch)
        if self.map_augment is not None and augment_labels is not None:
            features = features + self.map_augment(augment_labels.to(features.dtype))
        emb = self.embed[1:](features)                              # (B, 4 ch)
        h, skips = self._encode(self.conv_in(x), emb)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        h = self._decode(h, skips, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out / sigma.to(out.dtype)[:, None, None, None] if self.scale_by_sigma else out

    def _encode(self, h: Tensor, emb: Tensor) -> tuple[Tensor, List[Tensor]]:
        skips = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        return h, skips

    def _decode(self, h: Tensor, skips: List[Tensor], emb: Tensor) -> Tensor:
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if level.resample is not None:
                h = level.resample(h)
        return h


def _check_arguments(shape: tuple[int, int, int], ch_mult: List[int],
                     attn_resolutions: List[int], embedding: str) -> None:
    if embedding not in ("fourier", "sinusoidal"):
        raise ValueError(f"embedding must be 'fourier' or 'sinusoidal', got {embedding!r}")
    check_levels(shape, ch_mult, attn_resolutions, "a U-Net", "this U-Net")


def _noise_embedding(embedding: str, dim: int, fourier_scale: float) -> nn.Module:
    if embedding == "fourier":
        return GaussianFourierProjection(dim, fourier_scale)
    return SinusoidalEmbedding(dim)


def _attention_or_identity(use: bool, channels: int) -> nn.Module:
    return AttentionBlock(channels) if use else nn.Identity()


def _down_path(ch: int, ch_mult: List[int], num_res_blocks: int, attn: set, height: int,
               dropout: float) -> tuple[nn.ModuleList, List[int]]:
    """The levels from the finest resolution down, and the width of every skip tensor."""
    levels, skip_chs, width = nn.ModuleList(), [ch], ch
    for i, mult in enumerate(ch_mult):
        blocks, attns, res = [], [], height // 2 ** i
        for _ in range(num_res_blocks):
            blocks.append(ResBlock(width, ch * mult, 4 * ch, dropout))
            width = ch * mult
            attns.append(_attention_or_identity(res in attn, width))
            skip_chs.append(width)
        last = i == len(ch_mult) - 1
        levels.append(_Level(blocks, attns, None if last else Downsample(width)))
        if not last:
            skip_chs.append(width)
    return levels, skip_chs


def _up_path(ch: int, ch_mult: List[int], num_res_blocks: int, attn: set, height: int,
             dropout: float, skip_chs: List[int]) -> nn.ModuleList:
    """The levels from the coarsest resolution up; each block consumes one skip tensor."""
    levels, skip_chs, width = nn.ModuleList(), list(skip_chs), ch * ch_mult[-1]
    for i in reversed(range(len(ch_mult))):
        blocks, attns, res = [], [], height // 2 ** i
        for _ in range(num_res_blocks + 1):
            blocks.append(ResBlock(width + skip_chs.pop(), ch * ch_mult[i], 4 * ch, dropout))
            width = ch * ch_mult[i]
            attns.append(_attention_or_identity(res in attn, width))
        levels.append(_Level(blocks, attns, Upsample(width) if i > 0 else None))
    return levels
