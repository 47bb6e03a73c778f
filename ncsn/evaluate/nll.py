"""``metric=nll``: the test split's negative log-likelihood under a checkpoint's network,
through the probability-flow ODE (:func:`ncsn.likelihood.log_likelihood`), in nats per
sample and, for images, bits per dimension.

The test split is streamed a batch at a time; only running sums are kept. Images are
uniformly dequantized first (whatever the training config said: the bits/dim of discrete
data need it, as in the flow and score SDE papers), with noise drawn from the evaluation
seed, then mapped to the model's space as in training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ncsn import registry
from ncsn.data import first_tensor
from ncsn.data.images import (IMAGE_DATASETS, ModelSpace, image_config, model_space, off_grid,
                              pixel_levels)
from ncsn.likelihood import LogLikelihood, bits_per_dim, log_likelihood


@dataclass
class HeldOut:
    """The points scored: a dataset of model-space tensors, the model-space map, and the
    number of values a pixel takes (None for continuous 2-D points)."""

    dataset: torch.utils.data.Dataset
    space: ModelSpace
    levels: int | None


def held_out_split(dataset_cfg) -> HeldOut:
    """The test split of a dataset config: images uniformly dequantized (17 levels for the
    8x8 digits, whose pixels are k/16; 256 for 8-bit images), 2-D points as they are. A
    run trained with a validation split (``dataset.validation_fraction``) is scored on the
    test split all the same."""
    cfg = OmegaConf.to_container(dataset_cfg, resolve=True) \
        if OmegaConf.is_config(dataset_cfg) else dict(dataset_cfg)
    if cfg["name"] in IMAGE_DATASETS:
        image_cfg = replace(image_config(cfg), uniform_dequantization=True,
                            gaussian_dequantization=False, load_test=True, num_workers=0)
        if getattr(image_cfg, "validation_fraction", 0.0) > 0:
            image_cfg = replace(image_cfg, validation_fraction=0.0)
        resized = off_grid(image_cfg)
        if resized:
            raise registry.ConfigError(f"metric=nll: the checkpoint's {resized}; bits/dim "
                                       f"needs a run at the native size")
        data = registry.build_data(image_cfg)
        return HeldOut(data.test, model_space(image_cfg), pixel_levels(image_cfg.name))
    return HeldOut(registry.build_data(OmegaConf.create(cfg)).test, ModelSpace(), None)


def score_nll(ckpt: dict, draw, tools, scores) -> None:
    """Add ``nll`` (nats per sample), for images ``bpd``, and ``nll_nfe`` (the mean NFE of
    one batch's ODE solve) to ``scores``, with the offsets and the solver stated in notes.
    ``draw.n_samples`` caps the test samples used, ``draw.batch_size`` sets the batch."""
    from ncsn.generate import model_from_checkpoint

    options = tools.options
    net = model_from_checkpoint(ckpt, draw.use_ema, tools.device)
    exact = hasattr(net, "log_prob")        # a normalizing flow: its exact log-density
    sigmas = ckpt["sigmas"]
    sigma_min = options.nll_sigma_min or float(sigmas[-1])
    sigma_max = options.nll_sigma_max or float(sigmas[0])
    split = held_out_split(ckpt["config"]["dataset"])
    if split.dataset is None or len(split.dataset) == 0:
        raise registry.ConfigError("metric=nll scores the test split, but this dataset has "
                                   "none; set dataset.load_test=true (or n_test > 0)")
    n_total = min(draw.n_samples, len(split.dataset))
    torch.manual_seed(draw.seed)                     # the dequantization noise
    probes = torch.Generator().manual_seed(draw.seed)
    sums, nfes, n = {"nll": [0.0, 0.0], "bpd": [0.0, 0.0]}, [], 0
    for batch in DataLoader(split.dataset, batch_size=draw.batch_size, shuffle=False):
        x = first_tensor(batch)[:n_total - n].to(tools.device)
        if exact:
            with torch.no_grad():
                result = LogLikelihood(net.log_prob(x).double().cpu(), 1)
        else:
            result = log_likelihood(net, x, sigma_min, sigma_max, options.nll_rtol,
                                    options.nll_atol, options.nll_probes, options.nll_probe,
                                    options.nll_exact_divergence, probes)
        _accumulate(sums["nll"], -result.log_p)
        if split.levels is not None:
            _accumulate(sums["bpd"], bits_per_dim(result.log_p, x, split.space, split.levels))
        nfes.append(result.nfe)
        n += len(x)
        if n >= n_total:
            break
    _report(scores, sums, n, sum(nfes) / len(nfes), split, (sigma_min, sigma_max), options,
            int(x[0].numel()), exact)


def _accumulate(sums: list, values: torch.Tensor) -> None:
    sums[0] += float(values.sum())
    sums[1] += float(values.pow(2).sum())


def _mean_and_error(sums: list, n: int) -> tuple[float, float]:
    """The mean and its standard error from running sums of values and squares."""
    mean = sums[0] / n
    var = max(sums[1] / n - mean ** 2, 0.0) * n / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def _report(scores, sums: dict, n: int, nfe: float, split: HeldOut, sigma_range, options,
            d: int, exact: bool = False) -> None:
    scores.values["nll"], scores.values["nll_std"] = _mean_and_error(sums["nll"], n)
    if split.levels is not None:
        scores.values["bpd"], scores.values["bpd_std"] = _mean_and_error(sums["bpd"], n)
    scores.values["nll_nfe"] = nfe
    scores.details["nll_points"] = n
    divergence = "exact divergence" if options.nll_exact_divergence else \
        f"Hutchinson divergence, {options.nll_probes} {options.nll_probe} probe(s)"
    method = (f"probability-flow ODE from sigma {sigma_range[0]:.4g} to {sigma_range[1]:.4g}, "
              f"RK45 rtol {options.nll_rtol:g} atol {options.nll_atol:g}, {divergence}, prior "
              f"N(0, sigma_max^2 I)")
    if exact:
        method = "the flow's exact log-density (change of variables, one evaluation)"
    scores.notes.append(
        f"nll: -log p{'' if exact else '_sigma_min'}(x) in nats per test sample, in the model's "
        f"space (d = {d}); {method}; std: standard error of the mean over the {n} test samples")
    if split.levels is not None:
        scores.notes.append(_bpd_note(split))


def _bpd_note(split: HeldOut) -> str:
    levels, space = split.levels, split.space
    if space.logit:
        jacobian = f"+ the logit transform's log-det (lambda {space.lam:g}), per sample"
    elif space.rescaled:
        jacobian = "- 1 bit/dim for the map 2y - 1"
    else:
        jacobian = "no model-space term ([0, 1] as is)"
    return (f"bpd = -(log p(z) + log|det dz/dy| - d log {levels}) / (d log 2): test images "
            f"uniformly dequantized over {levels} levels (+ log2 {levels} = "
            f"{math.log2(levels):.4g} bits/dim), {jacobian}")
