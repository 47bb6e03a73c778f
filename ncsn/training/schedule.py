"""The learning rate at each step."""
from __future__ import annotations

import math

from ncsn import registry


def learning_rate(step: int, optim_cfg, n_steps: int, batch_size: int | None = None) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to zero; times
    EDM's ramp-up over ``lr_rampup_kimg`` thousand images when that is set (``batch_size``:
    the global batch)."""
    return _schedule(step, optim_cfg, n_steps) * lr_rampup(step, optim_cfg, batch_size)


# EDM (Karras et al. 2022), training/training_loop.py: lr * min(cur_nimg / (lr_rampup_kimg
# * 1000), 1), cur_nimg the images seen before this step (so its first step has lr 0).
def lr_rampup(step: int, optim_cfg, batch_size: int | None) -> float:
    """EDM's learning-rate ramp-up factor at ``step`` (0-based); 1 without
    optim.lr_rampup_kimg. A function of the step and the batch: a resumed run continues it."""
    rampup_kimg = optim_cfg.get("lr_rampup_kimg")
    if not rampup_kimg:
        return 1.0
    if batch_size is None:
        raise ValueError("optim.lr_rampup_kimg counts images: give the global batch_size")
    return min(step * batch_size / (rampup_kimg * 1000), 1.0)


def _schedule(step: int, optim_cfg, n_steps: int) -> float:
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
