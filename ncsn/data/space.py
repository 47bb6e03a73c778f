"""Model space: the map from [0, 1] images to what the network sees, and back."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def logit_transform(x: Tensor, lam: float = 1e-6) -> Tensor:
    """[0, 1] -> R: logit(lam + (1 - 2 lam) x), finite at 0 and 1 (RealNVP, Dinh et al. 2017,
    Sec. 4.1). Any shape."""
    p = lam + (1 - 2 * lam) * x
    return torch.log(p) - torch.log1p(-p)


def inverse_logit_transform(y: Tensor, lam: float = 1e-6) -> Tensor:
    """R -> [0, 1]: the exact inverse of :func:`logit_transform`. Any shape."""
    return (torch.sigmoid(y) - lam) / (1 - 2 * lam)


@dataclass(frozen=True)
class ModelSpace:
    """The map from [0, 1] images to the space the model sees, and back.

    ``rescaled``: x -> 2x - 1; ``logit``: x -> logit(lam + (1 - 2 lam) x); neither: identity.
    """

    rescaled: bool = False
    logit: bool = False
    lam: float = 1e-6

    def __call__(self, x: Tensor) -> Tensor:
        """Images in [0, 1] (any shape) -> model space."""
        if self.logit:
            return logit_transform(x, self.lam)
        return 2 * x - 1 if self.rescaled else x

    def inverse(self, y: Tensor) -> Tensor:
        """Model space (any shape) -> images, clamped to [0, 1] (samples may stray outside)."""
        if self.logit:
            y = inverse_logit_transform(y, self.lam)
        elif self.rescaled:
            y = (y + 1) / 2
        return y.clamp(0.0, 1.0)
