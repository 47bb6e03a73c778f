"""EDM's non-leaky augmentation (Karras et al. 2022, Sec. 5, "augmentation regularization", and
its appendix on the augmentation pipeline), as NVlabs/edm's ``training/augment.py``
``AugmentPipe`` runs it for ``train.py --augment=P`` (P = 0.12 for CIFAR-10).

Each training image is flipped, scaled, rotated, anisotropically scaled and translated, each
transformation applied with probability P (x-flips: always drawn, half of them flipped), and
the network is told what was done: 9 augmentation labels, a conditioning input beside the
noise level (``model.augment_dim=9``). At sampling the labels are zero, "no augmentation", so
the augmentations do not leak into the generated images (EDM, Sec. 5). The geometric
transformations are those of ADA (Karras et al. 2020, "Training generative adversarial
networks with limited data", its appendix on the pipeline): the image is padded by reflection,
upsampled 2x with the sym6 wavelet's low-pass filter, resampled bilinearly through the
inverse transformation G^-1, filtered and downsampled back.

Equal to EDM's code draw for draw: from the same torch random state, the same images and
labels (``scripts/check_edm.py`` runs both). Only what EDM's configurations turn on is here
(train.py: xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1, each
standard deviation at AugmentPipe's default); AugmentPipe's integer rotation and translation
and its colour transformations (brightness, contrast, luma flip, hue, saturation), which EDM
never turns on, are left out.

Under data-parallel training (:func:`ncsn.losses.batch_shard`) every draw is made for the
global batch and each process keeps its rows; the reflection padding, which EDM's code sizes
for its whole batch, is sized for the global batch too, so N ranks compute what one does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ncsn.losses import batch_rows

# The low-pass filter of the symlet of order 6 (Daubechies' least-asymmetric wavelet), as
# ADA's and EDM's pipelines list it ('sym6'): orthonormal, so that upsampling with it reversed
# and downsampling with it is the identity.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057,
        -0.048311742585633, 0.4910559419267466, 0.787641141030194, 0.3379294217276218,
        -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148)
FILTER_PAD = len(SYM6) // 4     # pixels of room for the filter on each side (3)
AUGMENT_DIM = 9                 # labels of EDM's pipeline: 2 flips, scale, rotation (2),
                                # anisotropy (2), translation (2)


# ----------------------------------------------------------------------------- matrices
def _matrix(*rows, device=None) -> Tensor:
    """A 3x3 matrix of numbers, ``(3, 3)`` float32, or of per-sample tensors of one shape
    ``S`` (numbers broadcast), ``(*S, 3, 3)``: homogeneous 2-D coordinates (x, y, 1)."""
    like = next((e for row in rows for e in row if isinstance(e, Tensor)), None)
    if like is None:
        return torch.tensor(rows, dtype=torch.float32, device=device)
    elems = [e if isinstance(e, Tensor) else torch.full_like(like, e) for row in rows for e in row]
    return torch.stack(elems, dim=-1).reshape(*like.shape, 3, 3)


def translation(tx, ty, device=None) -> Tensor:
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], device=device)


def scaling(sx, sy, device=None) -> Tensor:
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], device=device)


def rotation(theta: Tensor) -> Tensor:
    """Rotation by ``theta`` (radians, per sample) in pixel coordinates (y down)."""
    return _matrix([theta.cos(), (-theta).sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1])


# The inverses as EDM's code forms them (its float rounding included: 1 / s, not s^-1 exactly).
def translation_inv(tx, ty, device=None) -> Tensor:
    return translation(-tx, -ty, device=device)


def scaling_inv(sx, sy, device=None) -> Tensor:
    return scaling(1 / sx, 1 / sy, device=device)


def rotation_inv(theta: Tensor) -> Tensor:
    return rotation(-theta)


# ----------------------------------------------------------------------------- the pipe
@dataclass(frozen=True)
class AugmentPipe:
    """``pipe(images) -> (augmented, labels)``: images ``(B, C, H, W)`` -> the augmented
    images of the same shape and dtype and their labels ``(B, label_dim)`` float32, in EDM's
    order: x-flip, y-flip (0 or 1), w of the scaling 2^(scale_std w), cos(theta) - 1 and
    sin(theta) of the rotation, w cos(r) and w sin(r) of the anisotropic scaling 2^(aniso_std w)
    along the direction r, and the translation in units of translate_frac_std times the
    image's size. A transformation not applied has label 0.

    ``p`` is the overall probability; each transformation's multiplier times ``p`` is its
    probability (0: not drawn, no label). The defaults are EDM's ``--augment=0.12``.
    """

    p: float = 0.12
    xflip: float = 1e8              # train.py: 1e8 x p > 1, every image's flip drawn
    yflip: float = 1.0
    scale: float = 1.0
    rotate_frac: float = 1.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    scale_std: float = 0.2          # log2 standard deviation of the isotropic scaling
    rotate_frac_max: float = 1.0    # rotation range, 1 = the full circle
    aniso_std: float = 0.2          # log2 standard deviation of the anisotropic scaling
    aniso_rotate_prob: float = 0.5  # probability of scaling along a rotated direction
    translate_frac_std: float = 0.125   # translation's standard deviation / image size

    @property
    def label_dim(self) -> int:
        sizes = ((self.xflip, 1), (self.yflip, 1), (self.scale, 1), (self.rotate_frac, 2),
                 (self.aniso, 2), (self.translate_frac, 2))
        return sum(size for multiplier, size in sizes if multiplier > 0)

    @property
    def geometric(self) -> bool:
        return max(self.scale, self.rotate_frac, self.aniso, self.translate_frac) > 0

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # In float32 whatever the training's autocast (EDM augments outside its fp16 network).
        with torch.autocast(images.device.type, enabled=False):
            n, rows = batch_rows(images.shape[0])
            flips, labels = self._draw_flips(n, images.device)
            G_inv, geometric_labels = self._draw_geometry(n, *images.shape[2:], images.device)
            for dim, w in flips:                              # x-flip: dim 3, y-flip: dim 2
                images = torch.where(w[rows, None, None, None] == 1, images.flip(dim), images)
            if self.geometric:
                images = warp(images, G_inv[rows], padding(G_inv, *images.shape[2:]))
            labels = [x.to(torch.float32).reshape(n, -1) for x in labels + geometric_labels]
            labels = (torch.cat(labels, dim=1) if labels
                      else torch.zeros(n, 0, device=images.device))
        return images, labels[rows]

    def _gate(self, w: Tensor, multiplier: float) -> Tensor:
        """``w`` (``(n,)`` or ``(k, n)``) where a uniform draw, one per sample, falls below
        multiplier x p, else 0."""
        u = torch.rand(w.shape[-1:], device=w.device)
        return torch.where(u < multiplier * self.p, w, torch.zeros_like(w))

    def _draw_flips(self, n: int, device) -> tuple[list, list]:
        """Pixel blitting: ``[(dim, w)]`` with w (n,) in {0, 1}, and the labels."""
        flips = []
        for dim, multiplier in ((3, self.xflip), (2, self.yflip)):
            if multiplier > 0:
                w = self._gate(torch.randint(2, [n], device=device), multiplier)
                flips.append((dim, w))
        return flips, [w for _, w in flips]

    def _draw_geometry(self, n: int, height: int, width: int, device) -> tuple[Tensor, list]:
        """G^-1 ``(n, 3, 3)`` (output pixel -> input pixel, centred coordinates), and the
        labels; the draws in EDM's order."""
        G_inv, labels = torch.eye(3, device=device), []
        if self.scale > 0:                                    # isotropic scaling 2^(std w)
            w = self._gate(torch.randn([n], device=device), self.scale)
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ scaling_inv(s, s)
            labels += [w]
        if self.rotate_frac > 0:                              # rotation by w
            w = (torch.rand([n], device=device) * 2 - 1) * (math.pi * self.rotate_frac_max)
            w = self._gate(w, self.rotate_frac)
            G_inv = G_inv @ rotation_inv(-w)
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:                                    # 2^(std w) along direction r
            w = torch.randn([n], device=device)
            r = (torch.rand([n], device=device) * 2 - 1) * math.pi
            w = self._gate(w, self.aniso)
            r = torch.where(torch.rand([n], device=device) < self.aniso_rotate_prob, r,
                            torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotation_inv(r) @ scaling_inv(s, 1 / s) @ rotation_inv(-r)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:                           # by std x size x w, per axis
            w = self._gate(torch.randn([2, n], device=device), self.translate_frac)
            G_inv = G_inv @ translation_inv(w[0].mul(width * self.translate_frac_std),
                                            w[1].mul(height * self.translate_frac_std))
            labels += [w[0], w[1]]
        return G_inv, labels


# ----------------------------------------------------------------------------- geometry
def padding(G_inv: Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """The reflection padding ``(left, top, right, bottom)`` that covers where G^-1 ``(N, 3,
    3)`` takes the image's corners, for every sample, plus room for the filter; at most one
    less than the image's size (what reflection allows)."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = _matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1],
                      device=G_inv.device)                   # (corner, xy1)
    reach = (G_inv @ corners.t())[:, :2, :].permute(1, 0, 2).flatten(1)   # (xy, N x corner)
    margin = torch.cat([-reach, reach]).max(dim=1).values    # (x0, y0, x1, y1)
    margin = margin + _vector([FILTER_PAD * 2 - cx, FILTER_PAD * 2 - cy] * 2, G_inv.device)
    margin = margin.max(_vector([0, 0] * 2, G_inv.device))
    margin = margin.min(_vector([width - 1, height - 1] * 2, G_inv.device))
    left, top, right, bottom = margin.ceil().to(torch.int32).tolist()
    return left, top, right, bottom


def _vector(values, device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def geometric_transform(images: Tensor, G_inv: Tensor) -> Tensor:
    """``images`` ``(N, C, H, W)`` resampled through G^-1 ``(N, 3, 3)``: output pixel (x, y)
    (centred coordinates, y down) is the input at G^-1 (x, y, 1)."""
    return warp(images, G_inv, padding(G_inv, *images.shape[2:]))


def warp(images: Tensor, G_inv: Tensor, pad: tuple[int, int, int, int]) -> Tensor:
    """:func:`geometric_transform` with the padding given (:func:`padding` of the batch whose
    rows these are)."""
    N, C, H, W = images.shape
    left, top, right, bottom = pad
    images = F.pad(images, [left, right, top, bottom], mode="reflect")
    G_inv = translation((left - right) / 2, (top - bottom) / 2, device=images.device) @ G_inv
    images = upsample2(images)                               # pixel centres at 2x + 0.5
    G_inv = scaling(2, 2, device=images.device) @ G_inv @ scaling_inv(2, 2, device=images.device)
    G_inv = (translation(-0.5, -0.5, device=images.device) @ G_inv
             @ translation_inv(-0.5, -0.5, device=images.device))
    # to affine_grid's coordinates, [-1, 1] across the input and the output (2x, with room)
    shape = [N, C, (H + FILTER_PAD * 2) * 2, (W + FILTER_PAD * 2) * 2]
    G_inv = (scaling(2 / images.shape[3], 2 / images.shape[2], device=images.device) @ G_inv
             @ scaling_inv(2 / shape[3], 2 / shape[2], device=images.device))
    grid = F.affine_grid(G_inv[:, :2, :].to(images.dtype), size=shape, align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return downsample2(images)[:, :, FILTER_PAD:-FILTER_PAD, FILTER_PAD:-FILTER_PAD]


def _filter(images: Tensor, reverse: bool) -> Tensor:
    """The sym6 low-pass filter ``(C, 1, taps)``, one per channel."""
    taps = SYM6[::-1] if reverse else SYM6
    return torch.tensor(taps, dtype=images.dtype, device=images.device).repeat(images.shape[1], 1, 1)


def upsample2(images: Tensor) -> Tensor:
    """2x upsampling: zeros between the pixels, then the reversed filter; width, then
    height. ``(N, C, H, W) -> (N, C, 2H, 2W)``."""
    N, C = images.shape[:2]
    kernel, pad = _filter(images, reverse=True), (len(SYM6) + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], dim=4)
    images = images.reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
    images = F.conv2d(images, kernel[:, :, None, :], groups=C, padding=[0, pad])
    images = torch.stack([images, torch.zeros_like(images)], dim=3)
    images = images.reshape(N, C, -1, images.shape[4])[:, :, :-1, :]
    return F.conv2d(images, kernel[:, :, :, None], groups=C, padding=[pad, 0])


def downsample2(images: Tensor) -> Tensor:
    """The filter, then every other pixel; width, then height. ``(N, C, 2H, 2W) -> (N, C,
    H, W)``."""
    C = images.shape[1]
    kernel, pad = _filter(images, reverse=False), (len(SYM6) - 1) // 2
    images = F.conv2d(images, kernel[:, :, None, :], groups=C, stride=[1, 2], padding=[0, pad])
    return F.conv2d(images, kernel[:, :, :, None], groups=C, stride=[2, 1], padding=[pad, 0])
