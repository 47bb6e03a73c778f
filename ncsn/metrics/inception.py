"""The Inception-v3 network of FID and IS, rebuilt from torchvision's layers.

FID (Heusel et al. 2017) and IS (Salimans et al. 2016) are defined by one network: the
TensorFlow Inception-v3 graph of 2015-12-05, not torchvision's ImageNet model. That graph
differs from torchvision's in three places, all reproduced here:

* the average pools inside the A, C and E blocks do not count the zero padding
  (TensorFlow's ``avg_pool`` with SAME padding == ``count_include_pad=False``);
* the last E block (Mixed_7c) pools its fourth branch with a max pool, not an average;
* the classifier has 1008 outputs.

Input: images in [0, 1], (B, 3, H, W), resized bilinearly to 299 x 299 and scaled to
[-1, 1]. Output: the 2048-d pool_3 features (FID, KID) and the 1008 logits (IS).
Module names follow torchvision's ``Inception3`` (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.*``,
``fc.weight`` (1008, 2048) ...), the key names of the published PyTorch port of the TF
weights, so that file loads as is.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux,
                                          InceptionB, InceptionC, InceptionD, InceptionE)

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class InceptionWeightsNotFound(FileNotFoundError):
    """The FID Inception weights file is neither at the given path nor in the hub cache."""


def _avg_pool_same(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that ignores padding, as TF's SAME ``avg_pool`` does."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """torchvision's InceptionA (Mixed_5b-d) with the TF average pool."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))]


class FIDInceptionC(InceptionC):
    """torchvision's InceptionC (Mixed_6b-e) with the TF average pool."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7d = conv(b7d)
        return [self.branch1x1(x), b7, b7d, self.branch_pool(_avg_pool_same(x))]


class FIDInceptionE(InceptionE):
    """torchvision's InceptionE; the pool branch is TF's average pool (Mixed_7b) or a 3x3
    stride-1 max pool (Mixed_7c, where the 2015 graph has a max pool)."""

    def __init__(self, in_channels: int, max_pool: bool = False) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: Tensor) -> list[Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else _avg_pool_same(x))
        return [self.branch1x1(x), b3, b3d, self.branch_pool(pooled)]


class FIDInceptionV3(Inception3):
    """Inception-v3 as in the 2015-12-05 TF graph; ``forward`` returns (features, logits).

    ``logits`` are pool_3 features times the classifier weights *without* the bias, as in
    the reference IS code (OpenAI's ``inception_score.py`` multiplies pool_3 by the
    ``softmax/logits/MatMul`` weights); ``logits_with_bias`` adds ``fc.bias``.
    """

    def __init__(self) -> None:
        blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD,
                  FIDInceptionE, InceptionAux]
        super().__init__(num_classes=NUM_LOGITS, aux_logits=False, transform_input=False,
                         inception_blocks=blocks, init_weights=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.weights_source = "uninitialised"
        self.eval()

    @staticmethod
    def preprocess(x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 1] (bilinear, no antialias)."""
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def pool_features(self, x: Tensor) -> Tensor:
        """Preprocessed images (B, 3, 299, 299) -> pool_3 features (B, 2048)."""
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
                     "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(self, name)(x)
        return x.flatten(1)

    def logits(self, features: Tensor, with_bias: bool = False) -> Tensor:
        """pool_3 features (B, 2048) -> logits (B, 1008)."""
        return F.linear(features, self.fc.weight, self.fc.bias if with_bias else None)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> (features (B, 2048), logits (B, 1008))."""
        # channels-last activations run ~1.7x faster on CPU (oneDNN) and suit cuDNN too
        x = self.preprocess(x).contiguous(memory_format=torch.channels_last)
        feats = self.pool_features(x)
        return feats, self.logits(feats)


def default_weights_path() -> Path:
    """Where the published weights are looked for: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _missing_weights(looked_at: Path) -> InceptionWeightsNotFound:
    return InceptionWeightsNotFound(
        f"FID Inception weights not found at {looked_at}: download {WEIGHTS_FILE} from "
        f"{WEIGHTS_URL} and put it in {default_weights_path().parent}/ "
        f"(or pass eval.inception_weights=PATH)")


def _random_init_(model: nn.Module, seed: int) -> None:
    """He-normal convolutions so activations stay O(1) through the ~100 layers."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()


def fid_inception_v3(weights: str | os.PathLike | None = None, random_init: bool = False,
                     device: str | torch.device = "cpu", seed: int = 0) -> FIDInceptionV3:
    """Build the FID Inception network, in eval mode, on ``device``.

    weights: path to the published state dict ``pt_inception-2015-12-05-6726825d.pth``;
        None looks for that file in ``torch.hub.get_dir()/checkpoints/``. A missing file
        raises ``InceptionWeightsNotFound`` (nothing is downloaded).
    random_init: with ``weights=None``, skip the file and initialise randomly (seeded) --
        for tests and benchmarks only: scores from such a network are meaningless.
    """
    model = FIDInceptionV3()
    if random_init:
        if weights is not None:
            raise ValueError("pass either weights=PATH or random_init=True, not both")
        _random_init_(model, seed)
        model.weights_source = "random init (scores are meaningless)"
        return _place(model, device)
    path = Path(weights).expanduser() if weights is not None else default_weights_path()
    if not path.is_file():
        raise _missing_weights(path)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.weights_source = str(path)
    return _place(model, device)


def _place(model: FIDInceptionV3, device: str | torch.device) -> FIDInceptionV3:
    return model.to(device=device, memory_format=torch.channels_last)
