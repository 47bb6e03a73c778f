"""The exponential moving average of the weights (NCSNv2's Technique 5)."""
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


@torch.no_grad()
def update_ema(run: Run) -> None:
    """shadow <- mu shadow + (1 - mu) theta for every weight and buffer, as one
    ``torch._foreach_lerp_`` (the operation of torch's get_ema_multi_avg_fn, without
    AveragedModel's per-step regrouping and its host-side read of ``n_averaged``)."""
    shadow = [*run.ema.module.parameters(), *run.ema.module.buffers()]
    current = [*run.net.parameters(), *run.net.buffers()]
    torch._foreach_lerp_(shadow, current, 1.0 - run.cfg.trainer.ema_rate)
    run.ema.n_averaged += 1
