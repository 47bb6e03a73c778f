"""The one place where config names become parts: datasets, networks, noise tables,
objectives and samplers. A new part is a function here plus its YAML file and schema."""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ncsn import losses
from ncsn.data import Data, build_toy_data, first_tensor
from ncsn.data.images import IMAGE_DATASETS, build_image_data, image_config, model_space
from ncsn.nets.mlp import ConditionalMLP, ScoreMLP
from ncsn.nets.ncsn import NCSN
from ncsn.nets.ncsnv2 import NCSNv2
from ncsn.nets.unet import UNet
from ncsn.noise import geometric_sigmas, largest_pairwise_distance, num_scales_for
from ncsn.sampling import annealed_langevin, langevin


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


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp, "cond_mlp": _cond_mlp,
    "ncsn": _image_net(NCSN), "ncsnv2": _image_net(NCSNv2), "unet": _image_net(UNet),
}
CONDITIONAL_MODELS = {"cond_mlp", "ncsn", "ncsnv2", "unet"}


def build_model(cfg, shape, sigmas: Tensor) -> nn.Module:
    """A score network ``net(x, sigma)`` for samples of ``shape`` and the given sigma table."""
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of {sorted(MODELS)}")
    return MODELS[cfg.name](cfg, tuple(shape), sigmas)


def is_conditional(model_cfg) -> bool:
    return model_cfg.name in CONDITIONAL_MODELS


# ----------------------------------------------------------------------------- objectives
Objective = Callable[[nn.Module, Tensor], "tuple[Tensor, Tensor | None]"]


def _check_conditioning(loss_cfg, model_cfg, annealed: bool) -> None:
    if annealed and not is_conditional(model_cfg):
        raise ConfigError(f"loss={loss_cfg.name} is annealed over the sigma table and needs a "
                          f"noise-conditional network; use model=cond_mlp (or an image network)")
    if not annealed and is_conditional(model_cfg):
        raise ConfigError(f"loss={loss_cfg.name} learns the score of the clean data with an "
                          f"unconditional network; use model=mlp, or loss.annealed=true")


def build_objective(loss_cfg, model_cfg, sigmas: Tensor) -> Objective:
    """A training objective ``objective(net, x) -> (per_sample_loss (B,), labels (B,) | None)``
    where ``labels`` index the sigma each sample was perturbed with (None: not annealed)."""
    name = loss_cfg.name
    annealed = name == "anneal_dsm" or bool(loss_cfg.get("annealed", False))
    _check_conditioning(loss_cfg, model_cfg, annealed)
    if name == "anneal_dsm":
        per_sample = lambda net, x, labels: losses.anneal_dsm(
            net, x, sigmas.to(x.device), loss_cfg.anneal_power, labels, reduction="none")
    elif name == "dsm":
        sigma = loss_cfg.sigma if loss_cfg.sigma is not None else float(sigmas[-1])
        return lambda net, x: (losses.denoising_score_matching(
            lambda y: net(y, None), x, sigma, reduction="none"), None)
    elif name in ("ssm", "ssm_vr", "exact_sm"):
        objective, kwargs = _unannealed_objective(loss_cfg)
        if not annealed:
            return lambda net, x: (objective(lambda y: net(y, None), x, reduction="none", **kwargs), None)
        per_sample = lambda net, x, labels: losses.annealed(
            objective, net, x, sigmas.to(x.device), loss_cfg.anneal_power, labels,
            reduction="none", **kwargs)
    else:
        raise ConfigError(f"unknown loss {name!r}")

    def annealed_objective(net, x):
        labels = losses.draw_labels(x.shape[0], len(sigmas), x.device)
        return per_sample(net, x, labels), labels
    return annealed_objective


def _unannealed_objective(loss_cfg):
    if loss_cfg.name == "exact_sm":
        return losses.score_matching, {"max_dim": loss_cfg.max_dim}
    return losses.sliced_score_matching, {
        "n_projections": loss_cfg.n_projections, "projection": loss_cfg.projection,
        "variance_reduction": loss_cfg.variance_reduction}


# ----------------------------------------------------------------------------- samplers
Sampler = Callable[..., Tensor]


def initial_samples(cfg, n: int, shape, sigmas: Tensor, device, generator=None) -> Tensor:
    """The chain's starting points: N(0, init_std^2) (init_std null: sigma_begin, the
    largest noise level's spread) or uniform on [init_low, init_high]."""
    size = (n, *shape)
    if cfg.init == "gaussian":
        std = cfg.init_std if cfg.init_std is not None else float(sigmas[0])
        return std * torch.randn(size, generator=generator).to(device)
    if cfg.init == "uniform":
        return (cfg.init_low + (cfg.init_high - cfg.init_low) * torch.rand(size, generator=generator)).to(device)
    raise ConfigError(f"sampler.init must be 'gaussian' or 'uniform', got {cfg.init!r}")


def check_sampler(sampler_cfg, model_cfg) -> None:
    if sampler_cfg.name == "annealed_langevin" and not is_conditional(model_cfg):
        raise ConfigError(f"sampler=annealed_langevin needs a noise-conditional network, but "
                          f"model={model_cfg.name} is unconditional; use sampler=langevin")


def build_sampler(cfg, sigmas: Tensor) -> Sampler:
    """A sampler ``sampler(net, x_init, return_trajectory=False, progress=False)``."""
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
