"""The learning rate at each step."""
from __future__ import annotations

import math

from ncsn import registry


def learning_rate(step: int, optim_cfg, n_steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to zero."""
    lr = optim_cfg.lr
    if optim_cfg.warmup > 0 and step < optim_cfg.warmup:
        return lr * (step + 1) / optim_cfg.warmup
    if optim_cfg.schedule == "cosine":
        progress = (step - optim_cfg.warmup) / max(1, n_steps - optim_cfg.warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if optim_cfg.schedule != "constant":
        raise registry.ConfigError(f"optim.schedule must be 'constant' or 'cosine', "
                                   f"got {optim_cfg.schedule!r}")
    return lr
