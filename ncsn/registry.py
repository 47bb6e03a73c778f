"""The one place where config names become parts: datasets, networks, noise tables,
objectives and samplers. Networks and datasets are tables here; objectives and samplers are
classes registered in ``ncsn.objectives.OBJECTIVES`` and ``ncsn.samplers.SAMPLERS``, each
declaring its schema, checks and how it runs. A new part is an entry or a class plus its
YAML file."""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ncsn import objectives
from ncsn.data import Data, build_toy_data, first_tensor
from ncsn.data.images import IMAGE_DATASETS, build_image_data, image_config, model_space
from ncsn.flows import FLOW_MODELS, glow, nice, realnvp
from ncsn.nets.mlp import ConditionalMLP, ScoreMLP
from ncsn.nets.ncsn import NCSN
from ncsn.nets.ncsnpp import NCSNpp
from ncsn.nets.ncsnv2 import NCSNv2
from ncsn.nets.precond import network_config, precond_problems, precondition
from ncsn.nets.unet import UNet
from ncsn.noise import geometric_sigmas, largest_pairwise_distance, num_scales_for
from ncsn.objectives import OBJECTIVES, Objective
from ncsn.parts import ConfigError, Network
from ncsn.samplers import SAMPLERS, Sampler, SamplerSpec
from ncsn.sampling import initial_draw

__all__ = ["ConfigError", "Objective", "Sampler", "IMAGE_DATASETS"]


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
    "ncsnpp": _image_net(NCSNpp),
    "nice": _flow(nice), "realnvp": _flow(realnvp), "glow": _flow(glow),
}
CONDITIONAL_MODELS = {"cond_mlp", "ncsn", "ncsnv2", "unet", "ncsnpp"}


def build_model(cfg, shape, sigmas: Tensor) -> nn.Module:
    """A score network ``net(x, sigma)`` for samples of ``shape`` and the given sigma table,
    wrapped in EDM's preconditioning when ``cfg.precond`` asks (:mod:`ncsn.nets.precond`)."""
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of {sorted(MODELS)}")
    problems = precond_problems(cfg, network(cfg))
    if problems:
        raise ConfigError(problems[0])
    return precondition(MODELS[cfg.name](network_config(cfg), tuple(shape), sigmas), cfg)


def is_conditional(model_cfg) -> bool:
    return model_cfg.name in CONDITIONAL_MODELS


def is_flow(model_cfg) -> bool:
    """Whether the model is a normalizing flow: exact log p(x) and exact samples."""
    return model_cfg.name in FLOW_MODELS


def takes_sigma_values(model_cfg) -> bool:
    """Whether a network conditions on sigma's value, so that any sigma works: ncsnv2 (whose
    only conditioning is the division by sigma), unet, and cond_mlp and ncsnpp with their
    log-sigma embeddings; not ncsn, the multiplicative cond_mlp or ncsnpp's positional
    embedding, which look sigma up in the table."""
    if model_cfg.name == "cond_mlp":
        return model_cfg.embedding == "log_sigma"
    if model_cfg.name == "ncsnpp":
        return model_cfg.embedding_type == "fourier"
    return model_cfg.name in ("ncsnv2", "unet")


def network(model_cfg) -> Network:
    """What the objectives and samplers may ask of the network ``model_cfg`` builds."""
    batch_norm = model_cfg.name == "realnvp" and model_cfg.get("norm") == "batch"
    return Network(name=model_cfg.name, conditional=is_conditional(model_cfg),
                   takes_sigma_values=takes_sigma_values(model_cfg), flow=is_flow(model_cfg),
                   batch_statistics=batch_norm,
                   embedding=model_cfg.embedding if model_cfg.name == "cond_mlp" else None,
                   augment_dim=model_cfg.get("augment_dim"))


# ----------------------------------------------------------------------------- objectives
def objective_spec(loss_cfg, model_cfg, dataset_cfg=None) -> objectives.ObjectiveSpec:
    if loss_cfg.name not in OBJECTIVES:
        raise ConfigError(f"unknown loss {loss_cfg.name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[loss_cfg.name](loss_cfg, network(model_cfg), dataset_cfg)


def _held_out_spec(loss_cfg, model_cfg, dataset_cfg) -> objectives.ObjectiveSpec:
    """A flow's held-out loss: its negative log-likelihood, whatever it trains with."""
    return objectives.HeldOutLikelihood(loss_cfg, network(model_cfg), dataset_cfg)


def build_objective(loss_cfg, model_cfg, sigmas: Tensor, noise_cfg=None,
                    dataset_cfg=None) -> Objective:
    """A training objective ``objective(net, x) -> (per_sample_loss (B,), labels (B,) | None)``
    where ``labels`` index the sigma each sample was perturbed with (None: not annealed);
    see :mod:`ncsn.objectives`.

    For a flow (``model_cfg``) the objective carries ``held_out``: its negative
    log-likelihood (``dataset_cfg`` gives the pixel levels and the model-space map), the
    test loss whatever the training objective."""
    objective = objectives.build(objective_spec(loss_cfg, model_cfg, dataset_cfg), sigmas,
                                 noise_cfg)
    if is_flow(model_cfg):
        held_out = objectives.build(_held_out_spec(loss_cfg, model_cfg, dataset_cfg), sigmas)

        def flow_objective(net, x):
            return objective(net, x)
        flow_objective.held_out = held_out
        return flow_objective
    return objective


# ----------------------------------------------------------------------------- samplers
def sampler_spec(cfg) -> SamplerSpec:
    if cfg.name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {cfg.name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[cfg.name](cfg)


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


def check_sampler(sampler_cfg, model_cfg) -> None:
    """Raise the first way the sampler cannot run with the network."""
    problems = sampler_spec(sampler_cfg).problems(network(model_cfg))
    if problems:
        raise ConfigError(problems[0])


def part_problems(cfg) -> list[str]:
    """Every way the chosen model, loss, noise and sampler of a training config (``cfg``
    with ``model``, ``loss``, ``noise``, ``sampler``, ``dataset``) do not fit together, one
    message each, checked without building anything: a user fixes them all in one try
    instead of meeting them one run at a time."""
    problems = []
    for check in (lambda: precond_problems(cfg.model, network(cfg.model)),
                  lambda: sampler_spec(cfg.sampler).problems(network(cfg.model)),
                  lambda: objective_spec(cfg.loss, cfg.model, cfg.dataset).problems(cfg.noise),
                  lambda: (_held_out_spec(cfg.loss, cfg.model, cfg.dataset).problems()
                           if is_flow(cfg.model) and cfg.loss.name != "nll" else [])):
        try:
            problems += check()
        except ConfigError as err:
            problems.append(str(err))
    return problems


def sigma_grid(cfg, sigmas: Tensor, table_only: bool = False) -> Tensor:
    """The sigma levels the sampler steps through, largest first (see the sampler's class);
    ``table_only``: for a network that looks sigma up in its table."""
    net = Network(name="", conditional=True, takes_sigma_values=not table_only, flow=False)
    return sampler_spec(cfg).sigma_grid(sigmas, net)


def planned_nfe(cfg, n_levels: int) -> int | None:
    """Network evaluations (NFE) of one chain, known before it runs (None: the sampler's
    solver picks them, as the ODE's)."""
    return sampler_spec(cfg).nfe(n_levels)


def build_sampler(cfg, sigmas: Tensor, model_cfg=None) -> Sampler:
    """A sampler ``sampler(net, x_init, return_trajectory=False, progress=False, known=None)``.
    ``model_cfg`` tells pc and heun whether the network takes any sigma or only the table's
    (without it: any sigma)."""
    return sampler_spec(cfg).build(sigmas, network(model_cfg) if model_cfg is not None else None)
