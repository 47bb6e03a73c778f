"""The held-out loss, and best.pt (trainer.keep_best)."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from ncsn.checkpoint import save_best
from ncsn.data import first_tensor
from ncsn.training.context import evaluating
from ncsn.training.state import state_dict

if TYPE_CHECKING:
    from ncsn.training.run import Run


log = logging.getLogger(__name__)


def test_loss(run: Run, max_batches: int = 10) -> float | None:
    """Mean objective on the held-out split with the sampling (EMA) weights (the objective's
    ``held_out`` one when it has one: a flow's negative log-likelihood), in evaluation mode
    (a batch-normalised flow scores with its running averages, not the test batch's)."""
    if run.data.test is None or len(run.data.test) == 0:
        return None
    loader = torch.utils.data.DataLoader(run.data.test, batch_size=run.cfg.trainer.batch_size)
    total, count = 0.0, 0
    with evaluating(run.sampling_net) as net:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            x = first_tensor(batch).to(run.device)
            # Sliced and exact score matching differentiate with respect to x: keep grad on.
            with torch.enable_grad():
                per_sample, _ = getattr(run.objective, "held_out", run.objective)(net, x)
            total, count = total + per_sample.detach().sum().item(), count + len(x)
    return total / count


def held_out_name(dataset_cfg) -> str:
    """What the held-out loss is scored on: "validation" when the dataset holds out a
    validation split (``dataset.validation_fraction``), else "test"."""
    return "validation" if dataset_cfg.get("validation_fraction", 0.0) > 0 else "test"


def keep_if_best(run: Run, loss: float) -> None:
    """trainer.keep_best: write checkpoints/best.pt when ``loss`` is the lowest held-out loss
    of the run so far (model selection on held-out data, as the sliced score matching code
    keeps its NICE)."""
    if not run.cfg.trainer.keep_best or not math.isfinite(loss):
        return
    if run.best_loss is None or loss < run.best_loss:
        run.best_loss = loss
        path = save_best(state_dict(run), run.run_dir / "checkpoints", loss)
        log.info("step %d: best %s loss so far, kept in %s", run.step,
                 held_out_name(run.cfg.dataset), path)
