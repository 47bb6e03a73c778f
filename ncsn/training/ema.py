"""The exponential moving average of the weights (NCSNv2's Technique 5), at a fixed rate or
with EDM's half-life in images."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

if TYPE_CHECKING:
    from ncsn.training.run import Run


# NCSNv2 (Song & Ermon 2020), Technique 5, as its code keeps it (models/ema.py): the
# shadow starts at the initial weights theta_0 and, after every optimizer step,
# shadow <- mu shadow + (1 - mu) theta, so after k steps it is
# mu^k theta_0 + sum_j (1 - mu) mu^(k-j) theta_j.
def build_ema(net: nn.Module, ema_rate: float) -> AveragedModel:
    """torch's AveragedModel with the exponential rule, seeded with ``net``'s current weights.

    AveragedModel copies the weights at its first ``update_parameters``; calling it once
    here, before any optimizer step, makes that copy theta_0, as the reference's shadow.
    """
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_rate), use_buffers=True)
    ema.update_parameters(net)
    return ema


def plain_ema_state(state: dict) -> dict:
    """The EMA weights under the network's own keys. Checkpoints keep them so; older ones
    (version 1) kept AveragedModel's ``module.``-prefixed keys and its counter."""
    if "n_averaged" not in state:
        return state
    return {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}


# EDM (Karras et al. 2022), training/training_loop.py: the EMA's decay per step from a
# half-life counted in training images, ramped up at the start of training:
#   halflife = min(ema_halflife_kimg * 1000, cur_nimg * ema_rampup_ratio),
#   beta = 0.5^(batch_size / halflife),
# cur_nimg the images seen before this step.
def ema_beta(step: int, batch_size: int, halflife_kimg: float,
             rampup_ratio: float | None = 0.05) -> float:
    """EDM's EMA decay beta at ``step`` (0-based: ``step * batch_size`` images seen before it)
    for a global batch of ``batch_size``; ``rampup_ratio`` None: no ramp-up. At step 0 with
    the ramp-up, beta = 0: the average starts as the weights after the first step."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, step * batch_size * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def ema_decay(step: int, trainer_cfg) -> float:
    """The decay mu of ``shadow <- mu shadow + (1 - mu) theta`` at ``step``: trainer.ema_rate,
    or with trainer.ema_halflife_kimg EDM's beta (:func:`ema_beta`). A function of the step
    and the batch alone, so a resumed run continues it without saving anything more."""
    halflife = trainer_cfg.get("ema_halflife_kimg")
    if halflife is None:
        return trainer_cfg.ema_rate
    return ema_beta(step, trainer_cfg.batch_size, halflife, trainer_cfg.get("ema_rampup_ratio"))


@torch.no_grad()
def update_ema(run: Run) -> None:
    """shadow <- mu shadow + (1 - mu) theta for every weight and buffer (mu: :func:`ema_decay`
    at the step just taken), as one ``torch._foreach_lerp_`` (the operation of torch's
    get_ema_multi_avg_fn, without AveragedModel's per-step regrouping and its host-side read
    of ``n_averaged``)."""
    shadow = [*run.ema.module.parameters(), *run.ema.module.buffers()]
    current = [*run.net.parameters(), *run.net.buffers()]
    torch._foreach_lerp_(shadow, current, 1.0 - ema_decay(run.step, run.cfg.trainer))
    run.ema.n_averaged += 1
