"""The one place where config names become parts: datasets, networks, noise tables,
objectives and samplers. A new part is a function here plus its YAML file and schema."""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ncsn import losses
from ncsn.data import Data, build_toy_data, first_tensor
from ncsn.data.images import (IMAGE_DATASETS, ModelSpace, build_image_data, image_config,
                               model_space)
from ncsn.flows import FLOW_MODELS, exact_samples, glow, nice, pixel_levels, realnvp
from ncsn.flows.objective import nll_objective
from ncsn.nets.mlp import ConditionalMLP, ScoreMLP
from ncsn.nets.ncsn import NCSN
from ncsn.nets.ncsnv2 import NCSNv2
from ncsn.nets.unet import UNet
from ncsn.noise import geometric_sigmas, largest_pairwise_distance, num_scales_for, sigma_index
from ncsn.sampling import (annealed_langevin, edm_sigmas, heun, initial_draw, langevin,
                           predictor_corrector, probability_flow, table_subset)


class ConfigError(ValueError):
    """A configuration that composes but cannot work (say, an unconditional network with an
    annealed objective). The message says what to change."""


# ----------------------------------------------------------------------------- data
TOY_DATASETS = {"swiss_roll", "moons", "eight_gaussians", "checkerboard", "gaussian_mixture"}


def build_data(cfg) -> Data:
    if cfg.name in TOY_DATASETS:
        return build_toy_data(cfg)
    if cfg.name in IMAGE_DATASETS:
        try:
            return build_image_data(cfg)
        except (ValueError, ImportError) as err:
            raise ConfigError(f"dataset={cfg.name}: {err}") from None
    raise ConfigError(f"unknown dataset {cfg.name!r}")


def data_space_map(cfg):
    """The map from the model's space back to data space for a dataset config, without
    loading the data (2-D points: the identity)."""
    if cfg.name in TOY_DATASETS:
        return lambda x: x
    if cfg.name in IMAGE_DATASETS:
        return model_space(image_config(cfg)).inverse
    raise ConfigError(f"unknown dataset {cfg.name!r}")


# ----------------------------------------------------------------------------- noise
def build_sigmas(cfg, data: Data) -> Tensor:
    """The sigma table (largest first), resolving NCSNv2's ``auto`` rules on the data."""
    sigma_begin = cfg.sigma_begin
    if sigma_begin == "auto":
        points = torch.stack([first_tensor(data.train[i]) for i in range(min(len(data.train), cfg.n_subsample))])
        sigma_begin = largest_pairwise_distance(points, n_subsample=cfg.n_subsample)
    num_scales = cfg.num_scales
    if num_scales == "auto":
        dim = int(torch.Size(data.shape).numel())
        num_scales = num_scales_for(float(sigma_begin), cfg.sigma_end, dim)
    try:
        return geometric_sigmas(float(sigma_begin), float(cfg.sigma_end), int(num_scales))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"noise: {err} (sigma_begin and num_scales take a number or 'auto')") from err


# ----------------------------------------------------------------------------- models
def _flat_dim(shape) -> int:
    if len(shape) != 1:
        raise ConfigError(f"MLP score networks take flat vectors, but the data has shape "
                          f"{tuple(shape)}; pick an image network (model=unet)")
    return shape[0]


def _mlp(cfg, shape, sigmas):
    return ScoreMLP(_flat_dim(shape), cfg.hidden, cfg.n_layers, cfg.activation)


def _cond_mlp(cfg, shape, sigmas):
    return ConditionalMLP(_flat_dim(shape), sigmas, cfg.hidden, cfg.n_layers, cfg.embedding,
                          cfg.embedding_dim, cfg.activation, cfg.scale_by_sigma)


def _image_net(network: type[nn.Module]):
    def build(cfg, shape, sigmas):
        if len(shape) != 3:
            raise ConfigError(f"model={cfg.name} takes images (C, H, W), but the data has shape "
                              f"{tuple(shape)}; use model=cond_mlp for points")
        fields = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "name"}
        try:
            return network(shape, sigmas, **fields)
        except ValueError as err:
            raise ConfigError(f"model={cfg.name}: {err}") from None
    return build


def _flow(make_flow):
    """A normalizing flow on points or images; sigma is ignored (``net(x, sigma)`` is its
    exact score), so it is an unconditional model."""
    def build(cfg, shape, sigmas):
        fields = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "name"}
        try:
            return make_flow(shape, **fields)
        except ValueError as err:
            raise ConfigError(f"model={cfg.name}: {err}") from None
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp, "cond_mlp": _cond_mlp,
    "ncsn": _image_net(NCSN), "ncsnv2": _image_net(NCSNv2), "unet": _image_net(UNet),
    "nice": _flow(nice), "realnvp": _flow(realnvp), "glow": _flow(glow),
}
CONDITIONAL_MODELS = {"cond_mlp", "ncsn", "ncsnv2", "unet"}


def build_model(cfg, shape, sigmas: Tensor) -> nn.Module:
    """A score network ``net(x, sigma)`` for samples of ``shape`` and the given sigma table."""
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of {sorted(MODELS)}")
    return MODELS[cfg.name](cfg, tuple(shape), sigmas)


def is_conditional(model_cfg) -> bool:
    return model_cfg.name in CONDITIONAL_MODELS


def is_flow(model_cfg) -> bool:
    """Whether the model is a normalizing flow: exact log p(x) and exact samples."""
    return model_cfg.name in FLOW_MODELS


# What to choose instead of a network that can only look sigma up in its table.
TABLE_ONLY_ALTERNATIVE = {"ncsn": "model=ncsnv2 or model=unet",
                          "cond_mlp": "model.embedding=log_sigma"}


def takes_sigma_values(model_cfg) -> bool:
    """Whether a network conditions on sigma's value, so that any sigma works: ncsnv2 (whose
    only conditioning is the division by sigma), unet and cond_mlp with the log-sigma
    embedding; not ncsn or the multiplicative cond_mlp, which look sigma up in the table."""
    if model_cfg.name == "cond_mlp":
        return model_cfg.embedding == "log_sigma"
    return model_cfg.name in ("ncsnv2", "unet")


def _table_only_message(model_cfg) -> str:
    return (f"model={model_cfg.name}" + (f" (embedding={model_cfg.embedding})"
            if model_cfg.name == "cond_mlp" else "") + " can only look sigma up in its table")


# ----------------------------------------------------------------------------- objectives
Objective = Callable[[nn.Module, Tensor], "tuple[Tensor, Tensor | None]"]


def _check_conditioning(loss_cfg, model_cfg, annealed: bool) -> None:
    if annealed and not is_conditional(model_cfg):
        raise ConfigError(f"loss={loss_cfg.name} is annealed over the sigma table and needs a "
                          f"noise-conditional network; use model=cond_mlp (or an image network)")
    if not annealed and is_conditional(model_cfg):
        raise ConfigError(f"loss={loss_cfg.name} learns the score of the clean data with an "
                          f"unconditional network; use model=mlp, or loss.annealed=true")


def _check_batch_statistics(loss_cfg, model_cfg) -> None:
    if model_cfg.name == "realnvp" and model_cfg.get("norm") == "batch":
        raise ConfigError(f"loss={loss_cfg.name} needs each sample's score, but model.norm=batch "
                          f"normalises with the batch's statistics in training, so one "
                          f"sample's score depends on the rest of its batch; use loss=nll, or "
                          f"model.norm=actnorm")


def _check_continuous(loss_cfg, model_cfg, annealed: bool) -> None:
    if not annealed:
        raise ConfigError(f"noise.continuous=true draws sigma per sample for an annealed "
                          f"objective, but loss={loss_cfg.name} is not annealed; use "
                          f"loss=anneal_dsm (or loss.annealed=true), or noise.continuous=false")
    if not takes_sigma_values(model_cfg):
        raise ConfigError(f"noise.continuous=true draws sigma off the table, but "
                          f"{_table_only_message(model_cfg)}; choose "
                          f"{TABLE_ONLY_ALTERNATIVE[model_cfg.name]}, or noise.continuous=false")


def _flow_nll(loss_cfg, model_cfg, dataset_cfg) -> Objective:
    """Maximum likelihood (loss=nll): bits/dim of dequantized images, nats for points."""
    if not is_flow(model_cfg):
        raise ConfigError(f"loss={loss_cfg.name} needs an exact log-likelihood, but "
                          f"model={model_cfg.name} is a score network; use model=nice, "
                          f"model=realnvp or model=glow")
    if dataset_cfg is None or dataset_cfg.name not in IMAGE_DATASETS:
        return nll_objective(ModelSpace(), None)
    image_cfg = image_config(dataset_cfg)
    if not (image_cfg.uniform_dequantization or image_cfg.gaussian_dequantization):
        raise ConfigError(f"loss={loss_cfg.name} on discrete pixels needs dequantized data; "
                          f"set dataset.uniform_dequantization=true (or "
                          f"dataset.gaussian_dequantization=true)")
    return nll_objective(model_space(image_cfg), pixel_levels(image_cfg.name))


def build_objective(loss_cfg, model_cfg, sigmas: Tensor, noise_cfg=None,
                    dataset_cfg=None) -> Objective:
    """A training objective ``objective(net, x) -> (per_sample_loss (B,), labels (B,) | None)``
    where ``labels`` index the sigma each sample was perturbed with (None: not annealed).

    With ``noise_cfg.continuous`` each sample's sigma is drawn from ``noise_cfg.distribution``
    between the table's ends (:func:`ncsn.losses.draw_sigmas`), and ``labels`` are the
    nearest table levels in log sigma, so the per-level curves bin continuous sigma.

    For a flow (``model_cfg``) the objective carries ``held_out``: its negative
    log-likelihood (``dataset_cfg`` gives the pixel levels and the model-space map), the
    test loss whatever the training objective."""
    objective = _build_objective(loss_cfg, model_cfg, sigmas, noise_cfg, dataset_cfg)
    if is_flow(model_cfg):
        held_out = _flow_nll(loss_cfg, model_cfg, dataset_cfg)

        def flow_objective(net, x):
            return objective(net, x)
        flow_objective.held_out = held_out
        return flow_objective
    return objective


def _build_objective(loss_cfg, model_cfg, sigmas: Tensor, noise_cfg, dataset_cfg) -> Objective:
    name = loss_cfg.name
    if name == "nll":
        return _flow_nll(loss_cfg, model_cfg, dataset_cfg)
    _check_batch_statistics(loss_cfg, model_cfg)
    annealed = name == "anneal_dsm" or bool(loss_cfg.get("annealed", False))
    _check_conditioning(loss_cfg, model_cfg, annealed)
    continuous = noise_cfg is not None and bool(noise_cfg.get("continuous", False))
    if continuous:
        _check_continuous(loss_cfg, model_cfg, annealed)
    if name == "anneal_dsm":
        per_sample = lambda net, x, labels, sigma=None: losses.anneal_dsm(
            net, x, sigmas.to(x.device), loss_cfg.anneal_power, labels, reduction="none",
            sigma=sigma)
    elif name == "dsm":
        sigma = loss_cfg.sigma if loss_cfg.sigma is not None else float(sigmas[-1])
        return lambda net, x: (losses.denoising_score_matching(
            lambda y: net(y, None), x, sigma, reduction="none"), None)
    elif name in ("ssm", "ssm_vr", "exact_sm"):
        objective, kwargs = _unannealed_objective(loss_cfg)
        if not annealed:
            return lambda net, x: (objective(lambda y: net(y, None), x, reduction="none", **kwargs), None)
        per_sample = lambda net, x, labels, sigma=None: losses.annealed(
            objective, net, x, sigmas.to(x.device), loss_cfg.anneal_power, labels,
            reduction="none", sigma=sigma, **kwargs)
    else:
        raise ConfigError(f"unknown loss {name!r}")

    if continuous:
        return _continuous_objective(per_sample, noise_cfg, sigmas)

    def annealed_objective(net, x):
        labels = losses.draw_labels(x.shape[0], len(sigmas), x.device)
        return per_sample(net, x, labels), labels
    return annealed_objective


def _continuous_objective(per_sample, noise_cfg, sigmas: Tensor) -> Objective:
    if noise_cfg.distribution not in losses.SIGMA_DISTRIBUTIONS:
        raise ConfigError(f"noise.distribution must be one of "
                          f"{', '.join(losses.SIGMA_DISTRIBUTIONS)}, "
                          f"got {noise_cfg.distribution!r}")
    sigma_begin, sigma_end = float(sigmas[0]), float(sigmas[-1])

    def continuous_objective(net, x):
        sigma = losses.draw_sigmas(x.shape[0], sigma_begin, sigma_end, noise_cfg.distribution,
                                   noise_cfg.P_mean, noise_cfg.P_std, x)
        return per_sample(net, x, None, sigma), sigma_index(sigma, sigmas.to(x.device))
    return continuous_objective


def _unannealed_objective(loss_cfg):
    if loss_cfg.name == "exact_sm":
        return losses.score_matching, {"max_dim": loss_cfg.max_dim}
    return losses.sliced_score_matching, {
        "n_projections": loss_cfg.n_projections, "projection": loss_cfg.projection,
        "variance_reduction": loss_cfg.variance_reduction}


# ----------------------------------------------------------------------------- samplers
Sampler = Callable[..., Tensor]


def initial_samples(cfg, n: int, shape, sigmas: Tensor, device, generator=None) -> Tensor:
    """The chain's starting points ``(n, *shape)``: N(0, init_std^2) (init_std null:
    sigma_begin, the largest noise level's spread) or uniform on [init_low, init_high].
    Drawn from ``generator``, or per sample inside :func:`ncsn.sampling.per_sample_noise`."""
    size = (n, *shape)
    if cfg.init == "gaussian":
        std = cfg.init_std if cfg.init_std is not None else float(sigmas[0])
        return std * initial_draw(size, generator=generator).to(device)
    if cfg.init == "uniform":
        u = initial_draw(size, uniform=True, generator=generator)
        return (cfg.init_low + (cfg.init_high - cfg.init_low) * u).to(device)
    raise ConfigError(f"sampler.init must be 'gaussian' or 'uniform', got {cfg.init!r}")


ANNEALED_SAMPLERS = ("annealed_langevin", "pc", "ode", "heun")


def check_sampler(sampler_cfg, model_cfg) -> None:
    name = sampler_cfg.name
    if name == "flow" and not is_flow(model_cfg):
        raise ConfigError(f"sampler=flow draws exactly from a normalizing flow, but "
                          f"model={model_cfg.name} is a score network; use model=nice, "
                          f"model=realnvp or model=glow, or another sampler")
    if name in ANNEALED_SAMPLERS and not is_conditional(model_cfg):
        raise ConfigError(f"sampler={name} needs a noise-conditional network, but "
                          f"model={model_cfg.name} is unconditional; use sampler=langevin")
    if name in ANNEALED_SAMPLERS and not takes_sigma_values(model_cfg):
        if name == "ode":
            raise ConfigError(f"sampler=ode evaluates the network at whatever sigma the solver "
                              f"picks, but {_table_only_message(model_cfg)}; use sampler=heun "
                              f"or sampler=pc (they step on the table's levels)")
        if name == "heun" and sampler_cfg.S_churn > 0:
            raise ConfigError(f"sampler.S_churn > 0 raises sigma off the table, but "
                              f"{_table_only_message(model_cfg)}; use sampler.S_churn=0")


def part_problems(cfg) -> list[str]:
    """Every way the chosen model, loss, noise and sampler of a training config (``cfg``
    with ``model``, ``loss``, ``noise``, ``sampler``, ``dataset``) do not fit together, one
    message each, checked without building anything: a user fixes them all in one try
    instead of meeting them one run at a time."""
    loss, model = cfg.loss, cfg.model
    annealed = loss.name == "anneal_dsm" or bool(loss.get("annealed", False))
    checks = [lambda: check_sampler(cfg.sampler, model)]
    if loss.name == "nll" or is_flow(model):
        checks.append(lambda: _flow_nll(loss, model, cfg.dataset))
    if loss.name != "nll":
        checks += [lambda: _check_batch_statistics(loss, model),
                   lambda: _check_conditioning(loss, model, annealed)]
        if cfg.noise.get("continuous", False):
            checks.append(lambda: _check_continuous(loss, model, annealed))
    return [message for check in checks if (message := _problem(check))]


def _problem(check: Callable[[], object]) -> str | None:
    """The message of the :class:`ConfigError` that ``check()`` raises, or None."""
    try:
        check()
    except ConfigError as err:
        return str(err)
    return None


def sigma_grid(cfg, sigmas: Tensor, table_only: bool = False) -> Tensor:
    """The sigma levels pc and heun step through, largest first: the table when
    ``num_steps`` is null; else ``num_steps`` levels between the table's ends, geometric
    (pc, score SDE's VE discretization) or EDM's rho schedule (heun), or, for a network
    that looks sigma up in its table (``table_only``), that many of the table's levels."""
    try:
        if cfg.num_steps is None:
            return sigmas
        if table_only:
            return table_subset(sigmas, cfg.num_steps)
        if cfg.name == "heun":
            return edm_sigmas(float(sigmas[0]), float(sigmas[-1]), cfg.num_steps, cfg.rho,
                              sigmas.dtype)
        return geometric_sigmas(float(sigmas[0]), float(sigmas[-1]), cfg.num_steps, sigmas.dtype)
    except ValueError as err:
        raise ConfigError(f"sampler={cfg.name}: {err} (sampler.num_steps)") from None


def planned_nfe(cfg, n_levels: int) -> int | None:
    """Network evaluations (NFE) of one chain, known before it runs: annealed Langevin
    L T (+1 for denoising), Langevin its n_steps, pc N (n_corrector_steps + 1), heun 2N - 1
    (N: num_steps, or the table's L levels); None for the ODE, whose solver picks its steps."""
    if cfg.name == "annealed_langevin":
        return n_levels * cfg.n_steps_each + int(cfg.denoise)
    if cfg.name == "langevin":
        return cfg.n_steps
    if cfg.name == "flow":
        return 1
    steps = cfg.get("num_steps") or n_levels
    if cfg.name == "pc":
        return steps * (cfg.n_corrector_steps + 1)
    if cfg.name == "heun":
        return 2 * steps - 1
    return None


def build_sampler(cfg, sigmas: Tensor, model_cfg=None) -> Sampler:
    """A sampler ``sampler(net, x_init, return_trajectory=False, progress=False, known=None)``.
    ``model_cfg`` tells pc and heun whether the network takes any sigma or only the table's
    (without it: any sigma)."""
    table_only = model_cfg is not None and not takes_sigma_values(model_cfg)
    if cfg.name == "flow":
        return lambda net, x, **kw: exact_samples(net, x, cfg.temperature, **kw)
    if cfg.name == "pc":
        grid = sigma_grid(cfg, sigmas, table_only)
        return lambda net, x, **kw: predictor_corrector(
            net, x, grid.to(x.device), cfg.snr, cfg.n_corrector_steps, cfg.predictor,
            cfg.denoise, **kw)
    if cfg.name == "ode":
        return lambda net, x, **kw: probability_flow(
            net, x, float(sigmas[0]), float(sigmas[-1]), cfg.rtol, cfg.atol, cfg.method,
            cfg.denoise, **kw)
    if cfg.name == "heun":
        grid = sigma_grid(cfg, sigmas, table_only)
        return lambda net, x, **kw: heun(
            net, x, grid.to(x.device), cfg.S_churn, cfg.S_tmin, cfg.S_tmax, cfg.S_noise, **kw)
    if cfg.name == "annealed_langevin":
        return lambda net, x, **kw: annealed_langevin(
            net, x, sigmas.to(x.device), cfg.step_lr, cfg.n_steps_each, cfg.denoise, **kw)
    if cfg.name == "langevin":
        sigma = cfg.sigma if cfg.sigma is not None else float(sigmas[-1])

        def run(net, x, **kw):
            sigma_b = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
            return langevin(lambda y: net(y, sigma_b), x, cfg.step_size, cfg.n_steps, **kw)
        return run
    raise ConfigError(f"unknown sampler {cfg.name!r}")
