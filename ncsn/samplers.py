"""The samplers, one class each: its config schema (``Config``, what ``configs/sampler/*.yaml``
extend), its checks against the network, its sigma grid, its network evaluations (NFE) and
how it runs. The algorithms themselves are in :mod:`ncsn.sampling`.

A new sampler is a subclass registered with :func:`register_sampler` (plus, optionally, a
YAML file in ``configs/sampler/``); ``ncsn.registry`` finds it by ``cfg.name``, and
``sampler=NAME`` composes. ::

    @register_sampler
    class Midpoint(SamplerSpec):
        @dataclass
        class Config(SamplerInitConfig):
            name: str = "midpoint"
            num_steps: int = 50
        annealed = True
        def nfe(self, n_levels): ...
        def build(self, sigmas, network): ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

from ncsn.flows import exact_samples
from ncsn.noise import geometric_sigmas
from ncsn.parts import ConfigError, Network, register_part
from ncsn.sampling import (annealed_langevin, dpmpp_2m, edm_sigmas, euler, euler_ancestral,
                           heun, ipndm, langevin, predictor_corrector, probability_flow,
                           score_sde_sigmas, table_subset)

# ``sampler(net, x_init, return_trajectory=False, progress=False, known=None)``
Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, type["SamplerSpec"]] = {}


def register_sampler(cls: type["SamplerSpec"]) -> type["SamplerSpec"]:
    """Register a sampler class under its ``Config.name`` (see :func:`ncsn.parts.register_part`)."""
    return register_part(SAMPLERS, "sampler")(cls)


@dataclass
class SamplerInitConfig:
    init: str = "gaussian"           # gaussian | uniform: the chain's starting points
    init_std: Optional[float] = None # gaussian: null means sigma_begin
    init_low: float = -1.0           # uniform range
    init_high: float = 1.0


class SamplerSpec:
    """One sampler: ``SamplerSpec(cfg)`` for its config. ``annealed``: it steps through the
    noise levels and needs a noise-conditional network; ``for_flows``: it draws exactly from
    a normalizing flow and needs one."""

    Config: ClassVar[type] = SamplerInitConfig
    annealed: ClassVar[bool] = False
    for_flows: ClassVar[bool] = False
    # Inpainting (ncsn-sample mode=inpaint): the sampler takes ``known=KnownValues`` and sets
    # the known pixels at each level; ``fixed_known_noise``: one noise draw for their whole
    # path (the ODE's smooth y + sigma z) instead of a new one at each level.
    inpaints: ClassVar[bool] = False
    fixed_known_noise: ClassVar[bool] = False

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.name

    def problems(self, network: Network) -> list[str]:
        """Every way this sampler cannot run with ``network``, one message each."""
        if self.for_flows and not network.flow:
            return [f"sampler={self.name} draws exactly from a normalizing flow, but "
                    f"model={network.name} is a score network; use model=nice, model=realnvp "
                    f"or model=glow, or another sampler"]
        if self.annealed and not network.conditional:
            return [f"sampler={self.name} needs a noise-conditional network, but "
                    f"model={network.name} is unconditional; use sampler=langevin"]
        if self.annealed and not network.takes_sigma_values:
            return self.table_only_problems(network)
        return []

    def table_only_problems(self, network: Network) -> list[str]:
        """Problems with a network that can only look sigma up in its table (default: none,
        the sampler steps on the table's levels)."""
        return []

    def sigma_grid(self, sigmas: Tensor, network: Network | None = None) -> Tensor:
        """The sigma levels the sampler steps through, largest first (default: the table)."""
        return sigmas

    def nfe(self, n_levels: int) -> int | None:
        """Network evaluations of one chain, known before it runs (None: the sampler's solver
        picks them)."""
        return None

    def build(self, sigmas: Tensor, network: Network | None = None) -> Sampler:
        raise NotImplementedError


def _grid(spec: SamplerSpec, sigmas: Tensor, network: Network | None,
          between_ends: Callable[[float, float, int], Tensor]) -> Tensor:
    """pc's and heun's levels: the table when ``num_steps`` is null; else ``num_steps``
    levels between the table's ends (``between_ends``) or, for a network that looks sigma
    up in its table, that many of the table's levels."""
    num_steps = spec.cfg.num_steps
    try:
        if num_steps is None:
            return sigmas
        if network is not None and not network.takes_sigma_values:
            return table_subset(sigmas, num_steps)
        return between_ends(float(sigmas[0]), float(sigmas[-1]), num_steps)
    except ValueError as err:
        raise ConfigError(f"sampler={spec.name}: {err} (sampler.num_steps)") from None


@register_sampler
class AnnealedLangevin(SamplerSpec):
    """NCSN's annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1), NFE L T (+1 for
    the denoising step)."""

    @dataclass
    class Config(SamplerInitConfig):
        name: str = "annealed_langevin"
        step_lr: float = 1e-5
        n_steps_each: int = 100
        denoise: bool = True

    annealed = True
    inpaints = True

    def nfe(self, n_levels: int) -> int:
        return n_levels * self.cfg.n_steps_each + int(self.cfg.denoise)

    def build(self, sigmas: Tensor, network: Network | None = None) -> Sampler:
        c = self.cfg
        return lambda net, x, **kw: annealed_langevin(net, x, sigmas.to(x.device), c.step_lr,
                                                      c.n_steps_each, c.denoise, **kw)


@register_sampler
class Langevin(SamplerSpec):
    """Plain Langevin dynamics at one sigma, NFE n_steps."""

    @dataclass
    class Config(SamplerInitConfig):
        name: str = "langevin"
        step_size: float = 5e-5
        n_steps: int = 1000
        sigma: Optional[float] = None    # the sigma given to a conditional network; null: sigma_end

    def nfe(self, n_levels: int) -> int:
        return self.cfg.n_steps

    def build(self, sigmas: Tensor, network: Network | None = None) -> Sampler:
        c = self.cfg
        sigma = c.sigma if c.sigma is not None else float(sigmas[-1])

        def run(net, x, **kw):
            sigma_b = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
            return langevin(lambda y: net(y, sigma_b), x, c.step_size, c.n_steps, **kw)
        return run


PC_GRIDS = ("score_sde", "table")


@register_sampler
class PredictorCorrector(SamplerSpec):
    """Score SDE's predictor-corrector sampler for the VE SDE (Song et al. 2021, Algorithm 2,
    as their code's ``get_pc_sampler`` runs it), NFE N (n_corrector_steps + 1).

    The VE SDE's N discrete levels, geometric between the table's ends (the table itself
    when ``num_steps`` is null), set the predictor's steps (``sde.discretize``). The network
    is given, with ``grid=score_sde``, sigma(t_i) = sigma_min (sigma_max / sigma_min)^t_i at
    t_i = linspace(1, eps, N), as the code gives a continuous-time model; with
    ``grid=table``, the discrete levels themselves, as the code gives a discrete-time model
    (its label round((1 - t_i)(N - 1)) = i). A network that looks sigma up in its table
    always gets N of the table's levels."""

    @dataclass
    class Config(SamplerInitConfig):
        name: str = "pc"
        num_steps: Optional[int] = None  # null: the sigma table's levels; N: N levels geometric
                                         # between its ends (networks that look sigma up: N of
                                         # the table's)
        grid: str = "score_sde"          # score_sde: the network at sigma(t_i), t_i down to eps;
                                         # table: at the N levels themselves
        eps: float = 1e-5                # score SDE's last time for the VE SDE (sampling_eps)
        predictor: str = "reverse_diffusion"  # reverse_diffusion | euler_maruyama
        snr: float = 0.16                # the Langevin corrector's signal-to-noise ratio
        n_corrector_steps: int = 1
        denoise: bool = True             # return the last predictor step's mean

    annealed = True
    inpaints = True

    def problems(self, network: Network) -> list[str]:
        found = []
        if self.cfg.grid not in PC_GRIDS:
            found.append(f"sampler.grid must be one of {', '.join(PC_GRIDS)}, got "
                         f"{self.cfg.grid!r}")
        if not 0 < self.cfg.eps < 1:
            found.append(f"sampler.eps must be between 0 and 1, got {self.cfg.eps}")
        return found or super().problems(network)

    def predictor_table(self, sigmas: Tensor, network: Network | None = None) -> Tensor:
        """The VE SDE's N discrete levels, largest first: ``(N,)``."""
        return _grid(self, sigmas, network,
                     lambda hi, lo, n: geometric_sigmas(hi, lo, n, sigmas.dtype))

    def sigma_grid(self, sigmas: Tensor, network: Network | None = None) -> Tensor:
        table = self.predictor_table(sigmas, network)
        if self.cfg.grid == "table" or (network is not None and not network.takes_sigma_values):
            return table
        if self.cfg.grid != "score_sde":
            raise ConfigError(self.problems(network)[0])
        return score_sde_sigmas(float(sigmas[0]), float(sigmas[-1]), len(table),
                                self.cfg.eps).to(sigmas.dtype)

    def nfe(self, n_levels: int) -> int:
        return (self.cfg.num_steps or n_levels) * (self.cfg.n_corrector_steps + 1)

    def build(self, sigmas: Tensor, network: Network | None = None) -> Sampler:
        c = self.cfg
        grid, table = self.sigma_grid(sigmas, network), self.predictor_table(sigmas, network)
        return lambda net, x, **kw: predictor_corrector(
            net, x, grid.to(x.device), c.snr, c.n_corrector_steps, c.predictor, c.denoise,
            table=table.to(x.device), **kw)


@register_sampler
class ProbabilityFlow(SamplerSpec):
    """The probability-flow ODE (Song et al. 2021, Eq. 13) as score SDE's ``get_ode_sampler``
    solves it: in the VE SDE's time t from 1 to eps by scipy's solve_ivp. The solver picks
    the steps, so the NFE is known only afterwards."""

    @dataclass
    class Config(SamplerInitConfig):
        name: str = "ode"
        rtol: float = 1e-5               # scipy solve_ivp's tolerances (score SDE's)
        atol: float = 1e-5
        method: str = "RK45"             # a solve_ivp method: RK45 | RK23 | DOP853
        eps: float = 1e-5                # score SDE's last time for the VE SDE (sampling_eps)
        denoise: bool = True             # one more evaluation: x + sigma_min^2 s(x, sigma(eps))

    annealed = True
    inpaints = True
    fixed_known_noise = True

    def problems(self, network: Network) -> list[str]:
        if not 0 < self.cfg.eps < 1:
            return [f"sampler.eps must be between 0 and 1, got {self.cfg.eps}"]
        return super().problems(network)

    def table_only_problems(self, network: Network) -> list[str]:
        return [f"sampler=ode evaluates the network at whatever sigma the solver picks, but "
                f"{network.table_only}; use sampler=heun or sampler=pc (they step on the "
                f"table's levels)"]

    def build(self, sigmas: Tensor, network: Network | None = None) -> Sampler:
        c = self.cfg
        return lambda net, x, **kw: probability_flow(
            net, x, float(sigmas[0]), float(sigmas[-1]), c.rtol, c.atol, c.method, c.denoise,
            eps=c.eps, **kw)


@register_sampler
class Heun(SamplerSpec):
    """EDM's Heun sampler (Karras et al. 2022, Algorithms 1 and 2), NFE 2N - 1, its levels
    on EDM's rho schedule between the table's ends."""

    @dataclass
    class Config(SamplerInitConfig):
        name: str = "heun"
        num_steps: Optional[int] = 18    # N steps, 2N - 1 evaluations; null: the table's levels
        rho: float = 7.0                 # EDM's schedule between the table's ends
        S_churn: float = 0.0             # 0: EDM's deterministic Algorithm 1; > 0: Algorithm 2
        S_tmin: float = 0.0
        S_tmax: float = float("inf")
        S_noise: float = 1.0

    annealed = True
    inpaints = True

    def table_only_problems(self, network: Network) -> list[str]:
        if self.cfg.S_churn > 0:
            return [f"sampler.S_churn > 0 raises sigma off the table, but "
                    f"{network.table_only}; use sampler.S_churn=0"]
        return []

    def sigma_grid(self, sigmas: Tensor, network: Network | None = None) -> Tensor:
        return _grid(self, sigmas, network,
                     lambda hi, lo, n: edm_sigmas(hi, lo, n, self.cfg.rho, sigmas.dtype))

    def nfe(self, n_levels: int) -> int:
        return 2 * (self.cfg.num_steps or n_levels) - 1

    def build(self, sigmas: Tensor, network: Network | None = None) -> Sampler:
        c, grid = self.cfg, self.sigma_grid(sigmas, network)
        return lambda net, x, **kw: heun(net, x, grid.to(x.device), c.S_churn, c.S_tmin,
                                         c.S_tmax, c.S_noise, **kw)


# ----------------------------------------------------------------------------- few-step solvers
SCHEDULES = ("karras", "log_uniform", "table")


@dataclass
class SolverConfig(SamplerInitConfig):
    """What the few-step solvers share: ``num_steps`` levels between the table's ends, then
    sigma = 0, one network evaluation at each level."""
    num_steps: int = 10              # N levels, N network evaluations (NFE)
    schedule: str = "karras"         # karras: EDM's rho schedule | log_uniform: geometric |
                                     # table: num_steps of the table's own levels (a network
                                     # trained on the table only is accurate there alone)
    rho: float = 7.0                 # karras: EDM's (and k-diffusion's) rho


class Solver(SamplerSpec):
    """A few-step solver on the denoiser D(x; sigma) = x + sigma^2 s(x, sigma) over
    ``num_steps`` levels between the table's ends, EDM's rho schedule (k-diffusion's
    ``get_sigmas_karras``) or log-uniform (its ``get_sigmas_exponential``), then sigma = 0:
    NFE num_steps, the count k-diffusion makes on ``num_steps`` sigmas plus the appended
    zero. Subclasses give ``Config`` and ``solve(net, x, grid, **kw)``."""

    Config: ClassVar[type] = SolverConfig
    annealed = True
    inpaints = True

    def schedule_problems(self) -> list[str]:
        if self.cfg.schedule in SCHEDULES:
            return []
        return [f"sampler.schedule must be one of {', '.join(SCHEDULES)}, got "
                f"{self.cfg.schedule!r}"]

    def problems(self, network: Network) -> list[str]:
        return self.schedule_problems() or super().problems(network)

    def table_only_problems(self, network: Network) -> list[str]:
        if self.cfg.schedule == "table":
            return []
        return [f"sampler={self.name} evaluates the network between its table's levels, but "
                f"{network.table_only}; use sampler.schedule=table (it steps on the table's "
                f"levels), sampler=heun or sampler=pc, or {network.alternative}"]

    def sigma_grid(self, sigmas: Tensor, network: Network | None = None) -> Tensor:
        if self.cfg.schedule == "table":
            try:
                return table_subset(sigmas, self.cfg.num_steps)
            except ValueError as err:
                raise ConfigError(f"sampler={self.name}: {err} (sampler.num_steps)") from None
        if self.cfg.schedule == "log_uniform":
            return _grid(self, sigmas, network,
                         lambda hi, lo, n: geometric_sigmas(hi, lo, n, sigmas.dtype))
        if self.cfg.schedule == "karras":
            return _grid(self, sigmas, network,
                         lambda hi, lo, n: edm_sigmas(hi, lo, n, self.cfg.rho, sigmas.dtype))
        raise ConfigError(self.schedule_problems()[0])

    def nfe(self, n_levels: int) -> int:
        return self.cfg.num_steps

    def build(self, sigmas: Tensor, network: Network | None = None) -> Sampler:
        grid = self.sigma_grid(sigmas, network)
        return lambda net, x, **kw: self.solve(net, x, grid.to(x.device), **kw)

    def solve(self, net, x: Tensor, grid: Tensor, **kw):
        raise NotImplementedError


@register_sampler
class Euler(Solver):
    """Euler steps on the probability-flow ODE (k-diffusion's ``sample_euler``), NFE N."""

    @dataclass
    class Config(SolverConfig):
        name: str = "euler"
        num_steps: int = 50          # k-diffusion's sample.py --steps

    def solve(self, net, x, grid, **kw):
        return euler(net, x, grid, **kw)


@register_sampler
class EulerAncestral(Solver):
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``), NFE N."""

    @dataclass
    class Config(SolverConfig):
        name: str = "euler_ancestral"
        num_steps: int = 50          # k-diffusion's sample.py --steps
        eta: float = 1.0             # the share of the posterior's noise; 0: Euler
        s_noise: float = 1.0         # the noise's scale

    def solve(self, net, x, grid, **kw):
        return euler_ancestral(net, x, grid, self.cfg.eta, self.cfg.s_noise, **kw)


@register_sampler
class DPMpp2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; k-diffusion's ``sample_dpmpp_2m``),
    NFE N."""

    @dataclass
    class Config(SolverConfig):
        name: str = "dpmpp_2m"

    def solve(self, net, x, grid, **kw):
        return dpmpp_2m(net, x, grid, **kw)


@register_sampler
class IPNDM(Solver):
    """iPNDM (Zhang & Chen 2023; diff-sampler's ``ipndm_sampler`` with ``denoise_to_zero``),
    NFE N."""

    @dataclass
    class Config(SolverConfig):
        name: str = "ipndm"
        max_order: int = 4           # the Adams-Bashforth order, 1 to 4

    def problems(self, network: Network) -> list[str]:
        if 1 <= self.cfg.max_order <= 4:
            return super().problems(network)
        return [f"sampler.max_order must be 1 to 4, got {self.cfg.max_order}"]

    def solve(self, net, x, grid, **kw):
        return ipndm(net, x, grid, self.cfg.max_order, **kw)


@register_sampler
class FlowSampler(SamplerSpec):
    """Exact samples of a normalizing flow: x = f^-1(z), z from the prior at a temperature."""

    @dataclass
    class Config(SamplerInitConfig):
        name: str = "flow"               # exact samples of a normalizing flow: x = f^-1(z)
        temperature: float = 1.0         # the prior's scale (Glow: T < 1 for fidelity)
        init_std: Optional[float] = 1.0  # the starting points are read as standard normal draws

    for_flows = True

    def nfe(self, n_levels: int) -> int:
        return 1

    def build(self, sigmas: Tensor, network: Network | None = None) -> Sampler:
        return lambda net, x, **kw: exact_samples(net, x, self.cfg.temperature, **kw)
