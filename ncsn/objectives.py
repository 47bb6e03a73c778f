"""The training objectives, one class each: its config schema (``Config``, what
``configs/loss/*.yaml`` extend), its checks against the network, noise and data, and its loss.
The mathematics is in :mod:`ncsn.losses` (and :mod:`ncsn.flows.objective` for likelihood).

An objective built here is ``objective(net, x) -> (per_sample_loss (B,), labels (B,) | None)``,
``labels`` the index of the sigma each sample was perturbed with (None: not annealed). An
annealed objective declares its loss for given levels (:meth:`ObjectiveSpec.annealed_loss`);
drawing the levels, from the table or continuously, is the same for all of them
(:func:`build`). A new objective is a subclass registered with :func:`register_objective`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

from torch import Tensor, nn

from ncsn import losses
from ncsn.augment import AUGMENT_DIM, AugmentPipe
from ncsn.data.images import (IMAGE_DATASETS, ModelSpace, image_config, likelihood_levels,
                              model_space, off_grid)
from ncsn.flows.objective import nll_objective
from ncsn.noise import sigma_index
from ncsn.parts import ConfigError, Network, register_part

Objective = Callable[[nn.Module, Tensor], "tuple[Tensor, Tensor | None]"]
# ``loss(net, x, labels, sigma=None) -> (B,)``: an annealed objective at the table's levels
# ``labels`` (B,), or at the sigmas ``sigma`` (B,) drawn off the table.
AnnealedLoss = Callable[..., Tensor]

OBJECTIVES: dict[str, type["ObjectiveSpec"]] = {}


def register_objective(*names: str):
    """Register an objective class under ``names`` (default: its ``Config.name``)."""
    return register_part(OBJECTIVES, "loss", *names)


class ObjectiveSpec:
    """One objective: ``ObjectiveSpec(cfg, network, dataset_cfg)``."""

    Config: ClassVar[type]

    def __init__(self, cfg, network: Network, dataset_cfg=None):
        self.cfg, self.network, self.dataset_cfg = cfg, network, dataset_cfg

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def annealed(self) -> bool:
        """Trained over the sigma table with a noise-conditional network."""
        return bool(self.cfg.get("annealed", False))

    def problems(self, noise_cfg=None) -> list[str]:
        """Every way this objective cannot train ``network`` (with ``noise_cfg``), one each."""
        return [*self.batch_statistics_problems(), *self.conditioning_problems(),
                *self.continuous_problems(noise_cfg), *self.augment_problems()]

    def augment_problems(self) -> list[str]:
        """An objective that augments nothing (all but EDM's, :class:`_EDMObjective`) gives
        a network that embeds augmentation labels none: its weights would never train."""
        if self.network.augment_dim:
            return [f"model.augment_dim={self.network.augment_dim} embeds EDM's augmentation "
                    f"labels, which only loss=edm or loss=ve_edm with loss.augment_p > 0 "
                    f"gives; set model.augment_dim=0"]
        return []

    def batch_statistics_problems(self) -> list[str]:
        if self.network.batch_statistics:
            return [f"loss={self.name} needs each sample's score, but model.norm=batch "
                    f"normalises with the batch's statistics in training, so one sample's "
                    f"score depends on the rest of its batch; use loss=nll, or "
                    f"model.norm=actnorm"]
        return []

    def conditioning_problems(self) -> list[str]:
        if self.annealed and not self.network.conditional:
            return [f"loss={self.name} is annealed over the sigma table and needs a "
                    f"noise-conditional network; use model=cond_mlp (or an image network)"]
        if not self.annealed and self.network.conditional:
            return [f"loss={self.name} learns the score of the clean data with an "
                    f"unconditional network; use model=mlp, or loss.annealed=true"]
        return []

    def continuous_problems(self, noise_cfg) -> list[str]:
        if noise_cfg is None or not noise_cfg.get("continuous", False):
            return []
        if not self.annealed:
            return [f"noise.continuous=true draws sigma per sample for an annealed objective, "
                    f"but loss={self.name} is not annealed; use loss=anneal_dsm (or "
                    f"loss.annealed=true), or noise.continuous=false"]
        if not self.network.takes_sigma_values:
            return [f"noise.continuous=true draws sigma off the table, but "
                    f"{self.network.table_only}; choose {self.network.alternative}, or "
                    f"noise.continuous=false"]
        return []

    def loss(self, sigmas: Tensor) -> Objective:
        """The unannealed objective ``(net, x) -> (per_sample, None)``."""
        raise ConfigError(f"loss={self.name} is annealed only")

    def annealed_loss(self, sigmas: Tensor) -> AnnealedLoss:
        raise ConfigError(f"loss={self.name} cannot be annealed; set loss.annealed=false")


def build(spec: ObjectiveSpec, sigmas: Tensor, noise_cfg=None) -> Objective:
    """``spec``'s objective, its problems raised first (the first as a ConfigError). An
    annealed one draws each sample's level uniformly from the table (NCSN), or with
    ``noise_cfg.continuous`` its sigma from ``noise_cfg.distribution`` between the table's
    ends (:func:`ncsn.losses.draw_sigmas`), labelled with the nearest level in log sigma so
    that the per-level curves bin continuous sigma."""
    problems = spec.problems(noise_cfg)
    if problems:
        raise ConfigError(problems[0])
    if not spec.annealed:
        return spec.loss(sigmas)
    per_sample = spec.annealed_loss(sigmas)
    if noise_cfg is not None and noise_cfg.get("continuous", False):
        return _continuous(per_sample, noise_cfg, sigmas)

    def annealed_objective(net, x):
        labels = losses.draw_labels(x.shape[0], len(sigmas), x.device)
        return per_sample(net, x, labels), labels
    return annealed_objective


def _continuous(per_sample: AnnealedLoss, noise_cfg, sigmas: Tensor) -> Objective:
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


def _unconditional(net: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda y: net(y, None)


@register_objective()
class AnnealedDSM(ObjectiveSpec):
    """NCSN's annealed denoising score matching (Song & Ermon 2019, Eq. 6), each level's
    loss weighted by sigma^anneal_power."""

    @dataclass
    class Config:
        name: str = "anneal_dsm"
        anneal_power: float = 2.0

    @property
    def annealed(self) -> bool:
        return True

    def annealed_loss(self, sigmas: Tensor) -> AnnealedLoss:
        return lambda net, x, labels, sigma=None: losses.anneal_dsm(
            net, x, sigmas.to(x.device), self.cfg.anneal_power, labels, reduction="none",
            sigma=sigma)


@register_objective()
class DSM(ObjectiveSpec):
    """Denoising score matching at one sigma (Vincent 2011)."""

    @dataclass
    class Config:
        name: str = "dsm"
        sigma: Optional[float] = None    # null: the noise table's smallest sigma

    @property
    def annealed(self) -> bool:
        return False

    def loss(self, sigmas: Tensor) -> Objective:
        sigma = self.cfg.sigma if self.cfg.sigma is not None else float(sigmas[-1])
        return lambda net, x: (losses.denoising_score_matching(
            _unconditional(net), x, sigma, reduction="none"), None)


class _Unannealed(ObjectiveSpec):
    """An objective on clean data (``objective(score, x)``), annealed on request
    (``loss.annealed=true``: the same objective on sigma-perturbed data, as NCSN with sliced
    score matching)."""

    def objective(self) -> tuple[Callable[..., Tensor], dict]:
        raise NotImplementedError

    def loss(self, sigmas: Tensor) -> Objective:
        objective, kwargs = self.objective()
        return lambda net, x: (objective(_unconditional(net), x, reduction="none", **kwargs),
                               None)

    def annealed_loss(self, sigmas: Tensor) -> AnnealedLoss:
        objective, kwargs = self.objective()
        return lambda net, x, labels, sigma=None: losses.annealed(
            objective, net, x, sigmas.to(x.device), self.cfg.anneal_power, labels,
            reduction="none", sigma=sigma, **kwargs)


@register_objective("ssm", "ssm_vr")
class SlicedScoreMatching(_Unannealed):
    """Sliced score matching (Song et al. 2019), with variance reduction for ssm_vr."""

    @dataclass
    class Config:
        name: str = "ssm"
        n_projections: int = 1
        projection: str = "gaussian"     # gaussian | rademacher
        variance_reduction: bool = False
        annealed: bool = False           # perturb with the sigma table and condition the network
        anneal_power: float = 2.0

    def objective(self):
        c = self.cfg
        return losses.sliced_score_matching, {
            "n_projections": c.n_projections, "projection": c.projection,
            "variance_reduction": c.variance_reduction}


@register_objective()
class ExactScoreMatching(_Unannealed):
    """Hyvärinen's score matching with the Jacobian's trace computed exactly."""

    @dataclass
    class Config:
        name: str = "exact_sm"
        max_dim: int = 1024              # refuse data of more dimensions (one backward each)
        annealed: bool = False
        anneal_power: float = 2.0

    def objective(self):
        return losses.score_matching, {"max_dim": self.cfg.max_dim}


@register_objective()
class NegativeLogLikelihood(ObjectiveSpec):
    """Maximum likelihood of a flow: bits/dim of dequantized images, nats for points."""

    @dataclass
    class Config:
        name: str = "nll"                # maximum likelihood of a flow: bits/dim of the
                                         # dequantized images (dataset.uniform_dequantization),
                                         # nats for points

    @property
    def annealed(self) -> bool:
        return False

    def problems(self, noise_cfg=None) -> list[str]:
        return [message for message in (self._flow_problem(), self._dequantization_problem())
                if message]

    def _flow_problem(self) -> str | None:
        if not self.network.flow:
            return (f"loss={self.name} needs an exact log-likelihood, but "
                    f"model={self.network.name} is a score network; use model=nice, "
                    f"model=realnvp or model=glow")
        return None

    def _dequantization_problem(self) -> str | None:
        """Bits/dim are a bound on the discrete likelihood only for uniformly dequantized
        pixels on their grid (:func:`ncsn.data.images.likelihood_levels`)."""
        if not self._on_images():
            return None
        image_cfg = image_config(self.dataset_cfg)
        fix = ("set dataset.uniform_dequantization=true "
               "dataset.gaussian_dequantization=false")
        if image_cfg.gaussian_dequantization:
            return (f"loss={self.name} with dataset.gaussian_dequantization=true: clamping "
                    f"x + sigma z to [0, 1] leaves pixels exactly on 0 and 1 (29% of the "
                    f"digits'), where the density is unbounded, so -log p bounds nothing; {fix}")
        resized = off_grid(image_cfg)
        if resized:
            return f"loss={self.name}: {resized}; train at the native dataset.image_size=8"
        if not image_cfg.uniform_dequantization:
            return (f"loss={self.name} on discrete pixels needs uniformly dequantized data (a "
                    f"density on the pixel values themselves is unbounded); {fix}")
        return None

    def _on_images(self) -> bool:
        return self.dataset_cfg is not None and self.dataset_cfg.name in IMAGE_DATASETS

    def loss(self, sigmas: Tensor | None = None) -> Objective:
        if not self._on_images():
            return nll_objective(ModelSpace(), None)
        # loss=nll is refused where likelihood_levels is None; a flow's held-out loss under
        # another training loss is then -log p in nats of the data it sees
        image_cfg = image_config(self.dataset_cfg)
        return nll_objective(model_space(image_cfg), likelihood_levels(image_cfg))


class HeldOutLikelihood(NegativeLogLikelihood):
    """A flow's held-out loss whatever it trains with: its negative log-likelihood, in
    bits/dim where that bounds the discrete likelihood and in nats of the data it sees
    where it does not (then loss=nll itself is refused, not this report)."""

    def _dequantization_problem(self) -> str | None:
        return None


class _EDMObjective(ObjectiveSpec):
    """One of NVlabs/edm's training losses (training/loss.py): sigma drawn per sample as its
    code draws it, then lambda(sigma) ||D(y + n; sigma) - y||^2 (EDM, eq. 2 and 8), with
    D(x; sigma) = x + sigma^2 net(x, sigma), which for ``model.precond=edm|ve`` is the
    preconditioned denoiser of EDM's code (:mod:`ncsn.nets.precond`). Each sample is labelled
    with the nearest level of the noise table (in log sigma), as continuous noise is, so
    that the per-level curves bin its sigma. See :func:`ncsn.losses.denoiser_loss` for how
    the per-sample value relates to EDM's returned loss.

    ``loss.augment_p`` > 0: EDM's non-leaky augmentation (:mod:`ncsn.augment`; its
    ``--augment``) of the clean images, each transformation with that probability, the
    network given the 9 labels (``model.augment_dim=9``)."""

    draws: ClassVar[str] = ""            # how sigma is drawn, for messages

    @property
    def annealed(self) -> bool:
        return False

    def problems(self, noise_cfg=None) -> list[str]:
        return [*self.batch_statistics_problems(), *self.network_problems(),
                *self.noise_problems(noise_cfg), *self.augment_problems()]

    @property
    def augment_p(self) -> float:
        """loss.augment_p (0 in a config from before the key)."""
        return float(self.cfg.get("augment_p", 0.0))

    def augment_problems(self) -> list[str]:
        """EDM's augmentation needs the network to embed its labels, and the reverse."""
        p, dim = self.augment_p, self.network.augment_dim
        if not 0 <= p <= 1:
            return [f"loss.augment_p is a probability (EDM's --augment: 0.12), got {p}"]
        if p > 0 and dim is None:
            return [f"loss.augment_p={p} conditions the network on EDM's {AUGMENT_DIM} "
                    f"augmentation labels, but model={self.network.name} takes none; use "
                    f"model=ncsnpp or model=unet with model.augment_dim={AUGMENT_DIM}, or "
                    f"loss.augment_p=0"]
        if p > 0 and dim != AUGMENT_DIM:
            return [f"loss.augment_p={p} conditions the network on EDM's {AUGMENT_DIM} "
                    f"augmentation labels (non-leaky augmentation), but model.augment_dim="
                    f"{dim}; set model.augment_dim={AUGMENT_DIM}, or loss.augment_p=0"]
        if p == 0 and dim:
            return [f"model.augment_dim={dim} embeds EDM's augmentation labels, but "
                    f"loss.augment_p=0 gives none (those weights would never train); set "
                    f"loss.augment_p (EDM: 0.12), or model.augment_dim=0"]
        return []

    def network_problems(self) -> list[str]:
        if not self.network.conditional or self.network.flow:
            return [f"loss={self.name} trains a denoiser D(x; sigma) at every sigma and needs a "
                    f"network that takes sigma; use model=unet, model=ncsnv2 or model=cond_mlp "
                    f"(with model.precond=edm for EDM's preconditioning)"]
        if not self.network.takes_sigma_values:
            return [f"loss={self.name} draws sigma off the noise table, but "
                    f"{self.network.table_only}; choose {self.network.alternative}"]
        return []

    def noise_problems(self, noise_cfg) -> list[str]:
        if noise_cfg is not None and noise_cfg.get("continuous", False):
            return [f"loss={self.name} draws each sample's sigma itself ({self.draws}); "
                    f"noise.continuous is for loss=anneal_dsm; set noise.continuous=false"]
        return []

    def sigmas_and_weights(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``n`` noise levels drawn as EDM's code draws them, and their weights: ``(n,)`` each."""
        raise NotImplementedError

    def loss(self, sigmas: Tensor) -> Objective:
        augment = AugmentPipe(p=self.augment_p) if self.augment_p > 0 else None
        objective = self._objective(sigmas, augment)
        if augment is not None:
            # The held-out loss on the images as sampling sees them: not augmented, no labels
            # (the non-leaky condition), so that it does not move with the augmentation draws.
            objective.held_out = self._objective(sigmas, None)
        return objective

    def _objective(self, sigmas: Tensor, augment: AugmentPipe | None) -> Objective:
        def edm_objective(net, x):
            sigma, weight = self.sigmas_and_weights(x.shape[0], x)
            # EDM's loss: the clean images augmented after sigma is drawn, before the noise;
            # the target is the augmented image, and the network is told the labels
            y, labels = augment(x) if augment is not None else (x, None)
            per_sample = losses.denoiser_loss(losses.tweedie_denoiser(net, labels), y, sigma,
                                              weight, reduction="none")
            return per_sample, sigma_index(sigma, sigmas.to(x.device))
        return edm_objective


@register_objective()
class EDMLoss(_EDMObjective):
    """EDM's loss (Karras et al. 2022, Sec. 5 and Table 1, "Ours"; training/loss.py EDMLoss):
    ln sigma ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sigma_data^2) /
    (sigma sigma_data)^2."""

    @dataclass
    class Config:
        name: str = "edm"
        P_mean: float = -1.2             # ln sigma ~ N(P_mean, P_std^2), not truncated
        P_std: float = 1.2
        sigma_data: float = 0.5          # the data's standard deviation (model.sigma_data's twin)
        augment_p: float = 0.0           # EDM's non-leaky augmentation (--augment; 0: off)

    draws = "ln sigma ~ N(loss.P_mean, loss.P_std^2)"

    def sigmas_and_weights(self, n, like):
        sigma = losses.edm_sigmas(n, self.cfg.P_mean, self.cfg.P_std, like)
        return sigma, losses.edm_weight(sigma, self.cfg.sigma_data)


@register_objective()
class VELoss(_EDMObjective):
    """The VE loss of EDM's code (training/loss.py VELoss; score SDE's VE training): sigma
    log-uniform on [sigma_min, sigma_max], lambda(sigma) = 1 / sigma^2 (Table 1, "VE")."""

    @dataclass
    class Config:
        name: str = "ve_edm"
        sigma_min: float = 0.02          # sigma = sigma_min (sigma_max / sigma_min)^u, u ~ U(0, 1)
        sigma_max: float = 100.0
        augment_p: float = 0.0           # EDM's non-leaky augmentation (--augment; 0: off)

    draws = "log-uniform on [loss.sigma_min, loss.sigma_max]"

    def sigmas_and_weights(self, n, like):
        sigma = losses.ve_sigmas(n, self.cfg.sigma_min, self.cfg.sigma_max, like)
        return sigma, losses.ve_weight(sigma)
