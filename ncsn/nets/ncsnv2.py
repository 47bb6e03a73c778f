"""NCSNv2's score network (Song & Ermon 2020): an unconditional RefineNet whose output is
divided by sigma, s_theta(x, sigma) = s_theta(x) / sigma (Technique 3).

Called as ``net(x, sigma)``: ``x`` of shape ``(B, C, H, W)``, ``sigma`` of shape ``(B,)``,
any positive values (the network needs no noise table). The output has ``x``'s shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ncsn.nets.layers import (REFINENET_STAGES, InstanceNorm2dPlus, NoNorm, RefineNet,
                              n_subsamplings)
from ncsn.nets.mlp import make_activation


@dataclass
class NCSNv2Config:
    name: str = "ncsnv2"
    ngf: int = 128                   # base width (NCSNv2 uses 128 on every dataset)
    depth: str = "standard"          # standard (32-64 px) | deeper (96-128 px) | deepest (256 px)
    activation: str = "elu"
    rescale_input: bool = False      # h = 2x - 1 before the first conv (data in [0, 1])
    precond: str = "none"            # none | edm | ve: NVlabs/edm's EDMPrecond or VEPrecond around
                                     # the network (ncsn/nets/precond.py)
    sigma_data: float = 0.5          # precond=edm: the data's standard deviation (EDM's sigma_data)


# NCSNv2 (Song & Ermon 2020), Appendix B and Technique 3: RefineNet(x) / sigma, with
# unconditional instance normalization++ and unnormalized RefineNet blocks.
class NCSNv2(nn.Module):
    """The NCSNv2 RefineNet.

    Args:
        shape: ``(C, H, W)`` of one sample.
        sigmas: the noise table; unused (the network conditions on sigma's value only),
            accepted so that every image network is built as ``Net(shape, sigmas, ...)``.
        ngf: base width.
        depth: ``"standard"`` (4 stages, widths ngf..2 ngf, 1 subsampling; 32-64 px),
            ``"deeper"`` (5 stages up to 4 ngf, 2 subsamplings; 96-128 px) or
            ``"deepest"`` (6 stages up to 4 ngf, 3 subsamplings; 256 px).
        activation: nonlinearity name (NCSNv2: ``"elu"``).
        rescale_input: feed ``2x - 1`` to the first convolution. The authors' code does so
            whenever the data is neither rescaled to [-1, 1] nor logit-transformed, i.e. on
            data in [0, 1]; the paper does not mention it.
    """

    def __init__(self, shape: tuple[int, int, int], sigmas: Tensor | None = None,
                 ngf: int = 128, depth: str = "standard", activation: str = "elu",
                 rescale_input: bool = False):
        super().__init__()
        if depth not in REFINENET_STAGES:
            raise ValueError(f"depth must be one of {sorted(REFINENET_STAGES)}, got {depth!r}")
        stages = REFINENET_STAGES[depth]
        channels, height, width = shape
        smallest = 2 ** n_subsamplings(stages)
        if min(height, width) < smallest:
            raise ValueError(f"NCSNv2 depth={depth!r} halves the image "
                             f"{n_subsamplings(stages)} times and needs at least "
                             f"{smallest}x{smallest} pixels, got {shape}")
        self.rescale_input = rescale_input
        self.refinenet = RefineNet(channels, ngf, stages, norm=InstanceNorm2dPlus,
                                   refine_norm=NoNorm, act=make_activation(activation),
                                   pool="max")

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``x`` of shape ``(B, C, H, W)``, ``sigma`` of shape ``(B,)`` -> ``(B, C, H, W)``."""
        h = 2 * x - 1 if self.rescale_input else x
        out = self.refinenet(h)
        return out / sigma.to(out.dtype)[:, None, None, None]
