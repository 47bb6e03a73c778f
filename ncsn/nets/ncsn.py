"""NCSN's score network (Song & Ermon 2019): a RefineNet with dilated convolutions and
conditional instance normalization++, one set of normalization parameters per noise level.

Called as ``net(x, sigma)``: ``x`` of shape ``(B, C, H, W)``, ``sigma`` of shape ``(B,)``;
each sigma is mapped to the nearest entry (in log sigma) of the table the network was built
with, and that entry's index selects the normalization parameters. The output is a score
of ``x``'s shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ncsn.nets.layers import REFINENET_STAGES, CondInstanceNorm2dPlus, RefineNet
from ncsn.nets.mlp import make_activation
from ncsn.noise import sigma_index


@dataclass
class NCSNConfig:
    name: str = "ncsn"
    ngf: int = 128                   # base width; the paper uses 128 (CIFAR-10, CelebA), 64 (MNIST)
    activation: str = "elu"
    rescale_input: bool = False      # h = 2x - 1 before the first conv (data in [0, 1])


# NCSN (Song & Ermon 2019), Section 3.1 and Appendix A: s_theta(x, sigma_i), a 4-cascaded
# RefineNet with dilated convolutions and conditional instance normalization++.
class NCSN(nn.Module):
    """The NCSN RefineNet.

    Args:
        shape: ``(C, H, W)`` of one sample; H and W of at least 2 (one 2x2 mean pooling).
        sigmas: the noise table ``(L,)``, largest first; L sets the number of embedded
            noise levels. Kept as a buffer, so it travels with the checkpoint.
        ngf: base width (stages of ngf, 2 ngf, 2 ngf, 2 ngf channels).
        activation: nonlinearity name (NCSN: ``"elu"``).
        rescale_input: feed ``2x - 1`` to the first convolution. The authors' code does so
            whenever the data is not logit-transformed, i.e. on data in [0, 1]; the paper
            does not mention it. Not foldable into the first convolution: its zero padding
            sees the border as 0 in one space and as -1 in the other.
    """

    def __init__(self, shape: tuple[int, int, int], sigmas: Tensor, ngf: int = 128,
                 activation: str = "elu", rescale_input: bool = False):
        super().__init__()
        channels, height, width = shape
        if min(height, width) < 2:
            raise ValueError(f"NCSN subsamples once and needs images of at least 2x2, got {shape}")
        self.rescale_input = rescale_input
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32).clone())
        norm = partial(CondInstanceNorm2dPlus, num_classes=len(self.sigmas))
        self.refinenet = RefineNet(channels, ngf, REFINENET_STAGES["standard"], norm=norm,
                                   refine_norm=norm, act=make_activation(activation), pool="avg")

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``x`` of shape ``(B, C, H, W)``, ``sigma`` of shape ``(B,)`` -> ``(B, C, H, W)``."""
        h = 2 * x - 1 if self.rescale_input else x
        return self.refinenet(h, sigma_index(sigma, self.sigmas))

