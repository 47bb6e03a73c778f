"""Samplers: Langevin dynamics in the convention of the authors' code, and the faster
samplers of the later work on the same networks (score SDE's predictor-corrector and
probability-flow ODE, EDM's Heun steps, and the few-step solvers of k-diffusion and
diff-sampler: Euler, Euler ancestral, DPM-Solver++(2M), iPNDM).

Both repositories (ermongroup/ncsn, ermongroup/ncsnv2) step as

    x <- x + a s(x) + sqrt(2 a) z,    z ~ N(0, I),

with a = step_lr (sigma_i / sigma_L)^2 at noise level i (NCSNv2, Algorithm 1). The NCSN
paper's Algorithm 1 prints the same step as x + (eps/2) s(x) + sqrt(eps) z, so its eps is
2 a: a step size eps_paper from the paper's form is ``step_lr = eps_paper / 2`` here. The
published values (NCSN 2e-5; NCSNv2 6.2e-6, 3.3e-6, 4.9e-6, 1.8e-6) are the code's ``a``.

Every sampler runs under ``torch.no_grad()`` on a whole batch ``x`` of shape ``(B, ...)``
and returns the final batch, or ``(x, trajectory)`` with ``return_trajectory=True`` where
``trajectory`` is a CPU tensor of shape ``(K, B, ...)`` of snapshots of the chain. Each call
of the network is on the whole batch; :class:`CountingNet` counts them (NFE).

The variance-exploding noise of NCSN has marginals x + sigma z, z ~ N(0, I) (score SDE,
eq. 9 and 30), so the faster samplers need nothing but ``net(x, sigma)``: the reverse SDE
in sigma^2, dx = -s(x, sigma) d(sigma^2) + dw, and its probability-flow ODE
dx/dsigma = -sigma s(x, sigma), which with EDM's denoiser D(x; sigma) = x + sigma^2 s(x, sigma)
is dx/dsigma = (x - D(x; sigma)) / sigma (EDM, eq. 4 with s(t) = 1, sigma(t) = t).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

ScoreFn = Callable[[Tensor], Tensor]
ScoreNet = Callable[[Tensor, Tensor], Tensor]
Known = Callable[[Tensor, Tensor], Tensor]     # known(x, sigma) -> x, sigma a 0-d tensor


# ----------------------------------------------------------------------------- per-sample noise
# Every random number of a chain comes from `randn_like` (and its start from `initial_draw`).
# Inside `per_sample_noise`, row j of a batch draws from sample j's own generator, seeded from
# the run's seed and the sample's global index (EDM's generate.py `--seeds` and its
# StackedRandomGenerator), so a sample does not depend on the batch size, the batch it is in
# or the number of ranks. Outside, they are torch's global generator (torch.manual_seed).
NOISE_FLOATS_PER_SAMPLE = 4096      # the draw-ahead buffer per sample: 16 KB of float32
MAX_STEPS_AHEAD = 256


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a run seeded ``seed``: a SplitMix64 hash of
    ``seed`` plus ``index``. Consecutive indices get consecutive seeds, so a run's samples
    never share a stream, even on the CPU, whose Mersenne Twister keeps 32 bits of a seed;
    two seeds' runs of n samples share one only by a chance of about 2n / 2^32."""
    z = (seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % 2 ** 64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    return ((z ^ (z >> 31)) + index) % 2 ** 63


def steps_ahead(row_numel: int) -> int:
    """How many draws of one sample's noise ``(*shape)`` are made in one call of its
    generator: a function of the sample's size alone, so the stream is too. Small samples
    (2-D points, 8x8 digits) draw 64 to 256 steps at once, images of 4096 values or more
    one step at a time (there one call is already large)."""
    return max(1, min(MAX_STEPS_AHEAD, NOISE_FLOATS_PER_SAMPLE // max(1, row_numel)))


class SampleNoise:
    """One generator per sample (EDM's StackedRandomGenerator): the first draw of each is
    its chain's start (:meth:`initial`), every later one a standard normal of the chain's
    noise (:meth:`randn_like`). Normals are drawn ahead, ``steps_ahead`` steps per call of
    each generator, into a buffer ``(B, K, *shape)``: a generator call per sample and step
    would cost more than the network for small samples (scripts/bench_sample_ranks.py --seeds).

    ``seed``: the run's seed; ``indices``: the global indices of the batch's samples. A
    stream depends on (seed, index, the sample's shape and dtype, the device type): CPU
    and CUDA generators draw different numbers."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(sample_seed(seed, int(i)))
                           for i in indices]
        self.buffer: Tensor | None = None                 # (B, K, *shape)
        self.used = 0

    def __len__(self) -> int:
        return len(self.generators)

    def _check(self, size: Sequence[int]) -> None:
        if size[0] != len(self):
            raise ValueError(f"a draw for {size[0]} samples from the generators of {len(self)}")

    def initial(self, size: Sequence[int], uniform: bool = False,
                dtype: torch.dtype = torch.float32) -> Tensor:
        """``(B, *shape)``: each sample's first draw, N(0, I), or U[0, 1) with ``uniform``."""
        self._check(size)
        if self.buffer is not None:
            raise RuntimeError("a chain's start is its generator's first draw")
        draw = torch.rand if uniform else torch.randn
        out = torch.empty(tuple(size), dtype=dtype, device=self.device)
        for row, g in zip(out, self.generators):
            draw(row.shape, generator=g, dtype=dtype, device=self.device, out=row)
        return out

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normals shaped as ``x`` ``(B, *shape)``, row j from sample j's stream."""
        self._check(x.shape)
        if self.buffer is None or self.used == self.buffer.shape[1]:
            self._refill(tuple(x.shape[1:]), x.dtype)
        elif self.buffer.shape[2:] != x.shape[1:] or self.buffer.dtype != x.dtype:
            raise ValueError(f"per-sample noise of shape {tuple(self.buffer.shape[2:])} "
                             f"{self.buffer.dtype}, asked for {tuple(x.shape[1:])} {x.dtype}")
        self.used += 1
        return self.buffer[:, self.used - 1].to(x.device)

    def _refill(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        k = steps_ahead(math.prod(shape))
        self.buffer = torch.empty(len(self), k, *shape, dtype=dtype, device=self.device)
        for row, g in zip(self.buffer, self.generators):
            torch.randn(row.shape, generator=g, dtype=dtype, device=self.device, out=row)
        self.used = 0


_NOISE: ContextVar[SampleNoise | None] = ContextVar("ncsn_sample_noise", default=None)


@contextmanager
def per_sample_noise(seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
    """Chains started and run inside draw every random number of sample j from the generator
    of sample ``indices[j]`` of ``seed`` (:class:`SampleNoise`). Yields it."""
    noise = SampleNoise(seed, indices, device)
    token = _NOISE.set(noise)
    try:
        yield noise
    finally:
        _NOISE.reset(token)


def randn_like(x: Tensor) -> Tensor:
    """The samplers' noise: N(0, I) shaped as ``x`` ``(B, ...)``, per sample inside
    :func:`per_sample_noise`, from torch's global generator outside."""
    noise = _NOISE.get()
    return torch.randn_like(x) if noise is None else noise.randn_like(x)


def initial_draw(size: Sequence[int], uniform: bool = False,
                 generator: torch.Generator | None = None) -> Tensor:
    """A chain's start before scaling: N(0, I) (or U[0, 1) with ``uniform``) of ``size``
    ``(B, ...)`` on the CPU from ``generator``; inside :func:`per_sample_noise` each
    sample's first draw instead (on the generators' device)."""
    noise = _NOISE.get()
    if noise is not None:
        return noise.initial(size, uniform)
    draw = torch.rand if uniform else torch.randn
    return draw(tuple(size), generator=generator)


def quiet(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when not asked for; when asked, shown on a terminal only."""
    return None if progress else True


def langevin_step(score: Tensor, x: Tensor, step_size: float | Tensor) -> Tensor:
    """One Langevin step x + a s(x) + sqrt(2a) z with a = ``step_size`` and z ~ N(0, I),
    drawn after the score is computed, as in NCSNv2's code (the NCSN paper's form:
    x + (eps/2) s(x) + sqrt(eps) z, eps = 2a). ``score`` and ``x``: ``(B, ...)``."""
    a = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    return x + a * score + randn_like(x) * (2 * a).sqrt()


@torch.no_grad()
def langevin(score_fn: ScoreFn, x: Tensor, step_size: float, n_steps: int,
             return_trajectory: bool = False, snapshot_every: int | None = None,
             progress: bool = False):
    """Langevin dynamics: n_steps of x <- x + a s(x) + sqrt(2a) z, a = ``step_size``.

    For a step size eps of the NCSN paper's form (eps/2, sqrt(eps)) pass eps / 2.
    Snapshots (with ``return_trajectory``) are taken at the start and every
    ``snapshot_every`` steps (default: 50 snapshots over the chain) and at the end.
    """
    snapshot_every = snapshot_every or max(1, n_steps // 50)
    trajectory = [x.cpu()]
    for step in tqdm(range(1, n_steps + 1), desc="langevin", unit="NFE", disable=quiet(progress),
                     leave=False):
        x = langevin_step(score_fn(x), x, step_size)
        if return_trajectory and (step % snapshot_every == 0 or step == n_steps):
            trajectory.append(x.cpu())
    return (x, torch.stack(trajectory)) if return_trajectory else x


def annealed_step_sizes(sigmas: Tensor, step_lr: float) -> Tensor:
    """a_i = step_lr sigma_i^2 / sigma_L^2 (NCSN and NCSNv2, Algorithm 1), computed in the
    dtype of ``sigmas`` as NCSNv2's code does: ``(L,)`` -> ``(L,)``."""
    return step_lr * (sigmas / sigmas[-1]) ** 2


@torch.no_grad()
def annealed_langevin(net: ScoreNet, x: Tensor, sigmas: Tensor, step_lr: float,
                      n_steps_each: int, denoise: bool = False,
                      return_trajectory: bool = False, progress: bool = False,
                      known: Callable[[Tensor, int], Tensor] | None = None):
    """Annealed Langevin dynamics as the authors' code runs it (NCSN and NCSNv2, Algorithm 1).

    For each sigma_i from largest to smallest, ``n_steps_each`` steps of
    x <- x + a_i s(x, sigma_i) + sqrt(2 a_i) z with a_i = step_lr sigma_i^2 / sigma_L^2
    (the NCSN paper prints x + (alpha_i/2) s + sqrt(alpha_i) z: alpha_i = 2 a_i). With
    ``denoise=True``, NCSNv2's final step x <- x + sigma_L^2 s(x, sigma_L) (Tweedie's
    formula) removes the last noise. From the same seed and start the chain draws the same
    noise in the same order as the reference's ``anneal_Langevin_dynamics``.

    ``x``: ``(B, ...)`` starting points; ``sigmas``: ``(L,)``, largest first.
    ``known(x, i)``, if given, is applied before every evaluation of the network at level i
    (the steps, then the denoising step at level L-1): inpainting uses it to overwrite the
    known pixels, a recorder to watch the chain. Snapshots: the start, then the end of every
    level, then the denoised batch.
    """
    sigmas = sigmas.to(x.device, x.dtype)
    alphas = annealed_step_sizes(sigmas, step_lr)
    trajectory = [x.cpu()]
    # The bar counts network evaluations (NFE): L T, plus one for the denoising step.
    bar = tqdm(total=len(sigmas) * n_steps_each + int(denoise), desc="annealed langevin",
               unit="NFE", disable=quiet(progress), leave=False)
    for i in range(len(sigmas)):
        sigma = sigmas[i].expand(x.shape[0])                     # (B,)
        for _ in range(n_steps_each):
            if known is not None:
                x = known(x, i)
            x = langevin_step(net(x, sigma), x, alphas[i])
        bar.update(n_steps_each)
        if return_trajectory:
            trajectory.append(x.cpu())
    if denoise:
        if known is not None:
            x = known(x, len(sigmas) - 1)
        x = x + sigmas[-1] ** 2 * net(x, sigmas[-1].expand(x.shape[0]))
        bar.update(1)
        if return_trajectory:
            trajectory.append(x.cpu())
    bar.close()
    return (x, torch.stack(trajectory)) if return_trajectory else x


def ncsnv2_step_lr(sigmas: Tensor, n_steps_each: int) -> float:
    """NCSNv2's rule for step_lr (Technique 4), in the convention of the samplers here
    (x + a s + sqrt(2a) z, a = step_lr sigma_i^2 / sigma_L^2, as NCSNv2 derives it): the
    step_lr that brings

        (1 - eps/s)^(2T) (gamma^2 - 2 eps / (s - s (1 - eps/s)^2)) + 2 eps / (s - s (1 - eps/s)^2)

    closest to 1, with s = sigma_L^2, gamma = sigma_(i-1)/sigma_i, T = n_steps_each. With
    a = eps/s the expression is (1 - a)^(2T) (gamma^2 - 2/(2 - a)) + 2/(2 - a), so the rule
    fixes a and eps = a sigma_L^2. Searched on a fine logarithmic grid of a in (0, 1).
    """
    gamma = float(sigmas[0] / sigmas[1])
    a = torch.logspace(-8, -1e-6, 200_001, dtype=torch.float64)
    two_over = 2 / (2 - a)
    value = (1 - a) ** (2 * n_steps_each) * (gamma ** 2 - two_over) + two_over
    return float(a[(value - 1).abs().argmin()] * float(sigmas[-1]) ** 2)


class CountingNet:
    """A score network ``net(x, sigma)`` that counts its evaluations: ``nfe`` is the number
    of calls, each on a whole batch, so it is the network evaluations (NFE) of one chain.
    Every sampler can be handed one: ``counted = CountingNet(net); sampler(counted, x);
    counted.nfe``."""

    def __init__(self, net: ScoreNet):
        self.net, self.nfe = net, 0

    def __call__(self, x: Tensor, sigma: Tensor | None) -> Tensor:
        self.nfe += 1
        return self.net(x, sigma)


# ----------------------------------------------------------------------------- sigma grids
def table_subset(sigmas: Tensor, num_steps: int) -> Tensor:
    """``num_steps`` levels of a table, evenly spaced in index from the first to the last
    (a geometric table gives a geometric grid): ``(L,)`` -> ``(num_steps,)``. For networks
    that can only look sigma up in their table."""
    if not 2 <= num_steps <= len(sigmas):
        raise ValueError(f"a subset of the {len(sigmas)} table levels needs 2 to {len(sigmas)} "
                         f"steps, got num_steps={num_steps}")
    index = torch.linspace(0, len(sigmas) - 1, num_steps, dtype=torch.float64).round().long()
    return sigmas[index.to(sigmas.device)]


def edm_sigmas(sigma_max: float, sigma_min: float, num_steps: int, rho: float = 7.0,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """EDM's schedule (Karras et al. 2022, eq. 5): sigma_i = (sigma_max^(1/rho) + i/(N-1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1, largest first: ``(N,)``."""
    if num_steps < 2:
        raise ValueError(f"EDM's schedule needs num_steps >= 2, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((top + i / (num_steps - 1) * (bottom - top)) ** rho).to(dtype)


def _apply(known: Known | None, x: Tensor, sigma: Tensor) -> Tensor:
    return x if known is None else known(x, sigma)


def _batch(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.to(x.device, x.dtype).expand(x.shape[0])       # (B,)


def _mean_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).mean()


# ----------------------------------------------------------------------------- score SDE's VE time
# score_sde_pytorch runs its VE samplers in the SDE's time t in [eps, 1], sigma(t) =
# sigma_min (sigma_max / sigma_min)^t (sde_lib.VESDE, score SDE eq. 30), down to
# eps = 1e-5 (run_lib.py's sampling_eps for the VE SDE): its smallest level is
# sigma(eps) = sigma_min (sigma_max / sigma_min)^1e-5, 1e-4 above sigma_min for a ratio of 5000.
SCORE_SDE_EPS = 1e-5


def score_sde_times(num_steps: int, eps: float = SCORE_SDE_EPS) -> Tensor:
    """The PC sampler's times, t_i = linspace(T = 1, eps, N), in float32 as ``pc_sampler``
    computes them: ``(N,)``. ``(t_i (N - 1)).long()``, sde.discretize's index into its
    table, is N - 1 - i for eps = 1e-5 (tests/test_fast_samplers.py): step i goes from the
    table's level i (largest first) to level i + 1."""
    return torch.linspace(1, eps, num_steps)


def ve_sigma(t: Tensor, sigma_max: float, sigma_min: float) -> Tensor:
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t (VESDE.marginal_prob's std, score SDE
    eq. 30), in ``t``'s dtype, with the code's operations: the sigma a continuous-time VE
    model is given (models/utils.py ``get_score_fn``: ``labels = marginal_prob(0, t)[1]``)."""
    return sigma_min * (sigma_max / sigma_min) ** t


def score_sde_sigmas(sigma_max: float, sigma_min: float, num_steps: int,
                     eps: float = SCORE_SDE_EPS) -> Tensor:
    """The sigmas score SDE's PC sampler gives a continuous-time VE network, sigma(t_i) at
    t_i = linspace(1, eps, N): ``(N,)`` float32, largest first. Geometric like
    :func:`ncsn.noise.geometric_sigmas` between the same ends, but its last level is
    sigma(eps), not sigma_min."""
    return ve_sigma(score_sde_times(num_steps, eps), sigma_max, sigma_min)


# ----------------------------------------------------------------------------- predictor-corrector
PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def langevin_corrector_step_size(score: Tensor, z: Tensor, snr: float) -> Tensor:
    """The Langevin corrector's step, a = (snr ||z|| / ||s||)^2 2 alpha with alpha = 1 for the
    VE SDE, each norm the batch's mean of the per-sample norms (score SDE's
    ``LangevinCorrector``: ``torch.norm(grad.reshape(B, -1), dim=-1).mean()``). The paper's
    Algorithm 4 (VE) prints eps = 2 (r ||z||_2 / ||s||_2)^2 with the norms of the sample.
    ``score``, ``z``: ``(B, ...)``; returns a 0-d tensor."""
    return (snr * _mean_norm(z) / _mean_norm(score)) ** 2 * 2


@torch.no_grad()
def predictor_corrector(net: ScoreNet, x: Tensor, sigmas: Tensor, snr: float = 0.16,
                        n_corrector_steps: int = 1, predictor: str = "reverse_diffusion",
                        denoise: bool = True, return_trajectory: bool = False,
                        progress: bool = False, known: Known | None = None,
                        table: Tensor | None = None):
    """Score SDE's predictor-corrector sampler for the VE SDE (Song et al. 2021, Algorithm 2),
    as their code's ``get_pc_sampler`` runs it: at step i = 0..N-1, ``n_corrector_steps``
    Langevin corrector steps, then one predictor step, both with the network at
    ``sigmas[i]``. The paper's Algorithm 2 prints the predictor first and corrects at the
    level it arrives at; the code corrects before it predicts, and not after the last step.

    Corrector (``LangevinCorrector``): x <- x + a s + sqrt(2a) z with a from
    :func:`langevin_corrector_step_size` (the signal-to-noise rule). Predictor
    ``reverse_diffusion`` (``ReverseDiffusionPredictor`` with ``VESDE.discretize``, the
    paper's eq. 47): G_i = sqrt(table_i^2 - table_(i+1)^2), table_N = 0, and
    x <- x + G_i^2 s + G_i z. ``euler_maruyama`` (``EulerMaruyamaPredictor``: dt = 1/N,
    g(sigma) = sigma sqrt(2 log(table_0 / table_(N-1)))): x <- x + g^2 s / N + g sqrt(1/N) z.
    With ``denoise`` the last predictor step's mean is returned (the code's
    ``noise_removal``; for the reverse-diffusion predictor Tweedie's x + table_(N-1)^2 s):
    no extra evaluation.

    ``x``: ``(B, ...)`` starting points, ~ N(0, sigma_0^2 I). ``sigmas``: ``(N,)`` the sigma
    given to the network at each step, largest first: for a continuous-time network the
    code's sigma(t_i) (:func:`score_sde_sigmas`), for one that looks sigma up in its table
    the table's levels (the code's discrete-time labels, round((1 - t_i)(N - 1)) = i).
    ``table``: ``(N,)`` the VE SDE's discrete levels (``sde.discrete_sigmas``, largest
    first), which set the predictor's steps; None: ``sigmas``. ``known(x, sigma)``, if
    given, is applied before every evaluation of the network and to the result
    (inpainting). NFE: N (n_corrector_steps + 1), the code's count. Snapshots: the start
    and the end of every step.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
    sigmas = sigmas.to(x.device, x.dtype)
    table = sigmas if table is None else table.to(x.device, x.dtype)
    if table.shape != sigmas.shape:
        raise ValueError(f"a table of {len(table)} levels for {len(sigmas)} steps")
    # sde.discretize: G = sqrt(sigma_k^2 - adjacent^2), the adjacent level 0 after the last
    G = (table ** 2 - torch.cat([table[1:], table.new_zeros(1)]) ** 2).sqrt()
    # sde.sde's diffusion sigma(t) sqrt(2 (log sigma_max - log sigma_min)), and dt = 1/N
    em_root = torch.tensor(2 * (math.log(float(table[0])) - math.log(float(table[-1])))).sqrt()
    n = len(sigmas)
    trajectory = [x.cpu()]
    bar = tqdm(total=n * (n_corrector_steps + 1), desc="predictor-corrector",
               unit="NFE", disable=quiet(progress), leave=False)
    x_mean = x
    for i, sigma in enumerate(sigmas):
        for _ in range(n_corrector_steps):
            x = _apply(known, x, sigma)
            score = net(x, _batch(sigma, x))
            z = randn_like(x)
            a = langevin_corrector_step_size(score, z, snr)
            x = x + a * score + (a * 2).sqrt() * z
        x = _apply(known, x, sigma)
        score = net(x, _batch(sigma, x))
        if predictor == "reverse_diffusion":
            x_mean = x + G[i] ** 2 * score
            x = x_mean + G[i] * randn_like(x)
        else:
            g = sigma * em_root.to(x)
            x_mean = x + g ** 2 * score * (1 / n)
            x = x_mean + g * math.sqrt(1 / n) * randn_like(x)
        bar.update(n_corrector_steps + 1)
        if return_trajectory:
            trajectory.append((x_mean if denoise and i == n - 1 else x).cpu())
    bar.close()
    x = _apply(known, x_mean, sigmas.new_zeros(())) if denoise else _apply(known, x, sigmas[-1])
    return (x, torch.stack(trajectory)) if return_trajectory else x


# ----------------------------------------------------------------------------- probability flow
@torch.no_grad()
def probability_flow(net: ScoreNet, x: Tensor, sigma_max: float, sigma_min: float,
                     rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45",
                     denoise: bool = True, return_trajectory: bool = False,
                     progress: bool = False, known: Known | None = None,
                     eps: float = SCORE_SDE_EPS):
    """The probability-flow ODE of the VE SDE (score SDE, eq. 13) as their code's
    ``get_ode_sampler`` solves it: in the SDE's time t, from T = 1 to ``eps``, with scipy's
    adaptive ``solve_ivp`` (``method`` RK45, Dormand-Prince; rtol = atol = 1e-5), where
    sigma(t) = sigma_min (sigma_max / sigma_min)^t (:func:`ve_sigma`) and

        dx/dt = -g(t)^2 s(x, sigma(t)) / 2,   g(t)^2 = 2 sigma(t)^2 log(sigma_max / sigma_min)

    (``reverse(probability_flow=True)``). In sigma it is dx/dsigma = -sigma s(x, sigma)
    (EDM, eq. 4), the same curve; the solver's steps depend on the variable, and t is the
    code's. The whole batch is one system in float64 whose state is cast to ``x``'s dtype
    for the network, as in the code. With ``denoise``, one more evaluation at the end, the
    code's reverse-diffusion step from t = eps without its noise: x + sigma_min^2
    s(x, sigma(eps)) (``sde.discretize`` at timestep 0: G = sigma_min; Tweedie's formula).

    ``x``: ``(B, ...)`` ~ N(0, sigma_max^2 I). ``known(x, sigma)``, if given, replaces the
    known entries before every evaluation and at the end (the solver's own copy of them is
    never read). NFE: the solver's function evaluations (what the code reports), plus one
    for ``denoise`` (which the code does not count). Snapshots: 50 times evenly spaced in t.
    """
    shape, device, dtype = x.shape, x.device, x.dtype
    # sde.sde's diffusion g(t) = sigma(t) sqrt(2 (log sigma_max - log sigma_min))
    root = torch.tensor(2 * (math.log(sigma_max) - math.log(sigma_min))).sqrt().to(dtype)
    bar = tqdm(desc="probability flow", unit="NFE", disable=quiet(progress), leave=False)

    def velocity(t: float, y: np.ndarray) -> np.ndarray:
        sigma = ve_sigma(torch.ones(shape[0], device=device, dtype=dtype) * t, sigma_max,
                         sigma_min)                                           # (B,)
        x_t = _apply(known, torch.from_numpy(y).reshape(shape).to(device, dtype), sigma[0])
        bar.update(1)
        g = (sigma * root).view(-1, *[1] * (x_t.dim() - 1))
        drift = -(g ** 2 * net(x_t, sigma) * 0.5)
        return drift.cpu().numpy().reshape(-1)

    span = (1.0, eps)
    t_eval = np.linspace(*span, 50) if return_trajectory else None
    from scipy.integrate import solve_ivp     # here: scipy is slow to import

    solution = solve_ivp(velocity, span, x.cpu().numpy().reshape(-1), method=method,
                         rtol=rtol, atol=atol, t_eval=t_eval)
    if not solution.success:
        bar.close()
        raise RuntimeError(f"the probability-flow ODE solver failed: {solution.message}")
    sigma_eps = ve_sigma(torch.ones(shape[0], device=device, dtype=dtype) * eps, sigma_max,
                         sigma_min)
    x = _apply(known, torch.from_numpy(solution.y[:, -1]).reshape(shape).to(device, dtype),
               sigma_eps[0])
    if denoise:
        G = torch.tensor(sigma_min, device=device, dtype=dtype)
        x = _apply(known, x + G ** 2 * net(x, sigma_eps), sigma_eps.new_zeros(()))
        bar.update(1)
    bar.close()
    if not return_trajectory:
        return x
    trajectory = torch.from_numpy(solution.y.T).reshape(-1, *shape).to(dtype)
    return x, torch.cat([trajectory, x.cpu()[None]])


# ----------------------------------------------------------------------------- EDM's Heun sampler
@torch.no_grad()
def heun(net: ScoreNet, x: Tensor, sigmas: Tensor, S_churn: float = 0.0, S_tmin: float = 0.0,
         S_tmax: float = float("inf"), S_noise: float = 1.0, return_trajectory: bool = False,
         progress: bool = False, known: Known | None = None):
    """EDM's sampler (Karras et al. 2022, Algorithm 2; Algorithm 1 when ``S_churn`` = 0),
    with the denoiser of a score network, D(x; sigma) = x + sigma^2 s(x, sigma), so that
    the ODE's slope is d = (x - D(x; sigma)) / sigma = -sigma s(x, sigma).

    For i = 0..N-1 over the grid ``sigmas`` with sigma_N = 0: gamma_i =
    min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax (else 0); sigma_hat =
    (1 + gamma_i) sigma_i; x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise z; an Euler
    step x' = x_hat + (sigma_(i+1) - sigma_hat) d(x_hat, sigma_hat) and, except at the last
    step (to sigma = 0, where the Euler step is Tweedie's denoising x_hat + sigma_hat^2 s),
    the second-order correction x' = x_hat + (sigma_(i+1) - sigma_hat)(d + d(x', sigma_(i+1)))/2.

    ``x``: ``(B, ...)`` ~ N(0, sigma_0^2 I); ``sigmas``: ``(N,)``, largest first (EDM's
    schedule: :func:`edm_sigmas`). ``known(x, sigma)``, if given, is applied before every
    evaluation and to the result (at sigma = 0). NFE: 2N - 1. Snapshots: the start and the
    end of every step.
    """
    sigmas = sigmas.to(x.device, x.dtype)
    n = len(sigmas)
    next_sigmas = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
    trajectory = [x.cpu()]
    bar = tqdm(total=2 * n - 1, desc="heun", unit="NFE", disable=quiet(progress), leave=False)

    def slope(y: Tensor, sigma: Tensor) -> Tensor:
        return -sigma * net(y, _batch(sigma, y))                    # (y - D(y; sigma)) / sigma

    for i, (sigma, sigma_next) in enumerate(zip(sigmas, next_sigmas)):
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= float(sigma) <= S_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + (sigma_hat ** 2 - sigma ** 2).sqrt() * S_noise * randn_like(x)
        x = _apply(known, x, sigma_hat)
        d = slope(x, sigma_hat)
        x_next = x + (sigma_next - sigma_hat) * d
        if i < n - 1:
            x_next = _apply(known, x_next, sigma_next)
            x_next = x + (sigma_next - sigma_hat) * (d + slope(x_next, sigma_next)) / 2
        x = x_next
        bar.update(2 if i < n - 1 else 1)
        if return_trajectory:
            trajectory.append(x.cpu())
    bar.close()
    x = _apply(known, x, sigmas.new_zeros(()))
    return (x, torch.stack(trajectory)) if return_trajectory else x


# ----------------------------------------------------------------------------- few-step solvers
# The samplers of crowsonkb/k-diffusion (k_diffusion/sampling.py: sample_euler,
# sample_euler_ancestral, sample_dpmpp_2m) and iPNDM as zju-pi/diff-sampler codes it
# (diff-solvers-main/solvers.py, ipndm_sampler), on EDM's denoiser of a score network. Each
# takes the grid ``sigmas`` ``(N,)``, largest first, appends sigma_N = 0 (k-diffusion's
# ``append_zero``) and evaluates the network once at each sigma_i, for the step to
# sigma_(i+1): NFE N. The arithmetic is the reference code's, operation for operation, so on
# the same grid and noise the chains are equal to the bit (scripts/check_solvers.py).
Step = Callable[[int, Tensor, Tensor, Tensor, Tensor], Tensor]


def denoised(net: ScoreNet, x: Tensor, sigma: Tensor) -> Tensor:
    """EDM's denoiser of a score network, D(x; sigma) = x + sigma^2 s(x, sigma) (EDM, eq. 3:
    the score is (D(x; sigma) - x) / sigma^2; Tweedie's formula). ``x``: ``(B, ...)``;
    ``sigma``: a 0-d tensor."""
    return x + sigma ** 2 * net(x, _batch(sigma, x))


def _solve(net: ScoreNet, x: Tensor, sigmas: Tensor, step: Step, desc: str,
           return_trajectory: bool, progress: bool, known: Known | None):
    """The loop the solvers share: at each sigma_i of ``sigmas`` (then sigma_N = 0), one
    evaluation D_i = D(x; sigma_i) and ``x = step(i, x, D_i, sigma_i, sigma_(i+1))``.
    ``known(x, sigma)``, if given, is applied before every evaluation and to the result (at
    sigma = 0), as in :func:`heun`. Snapshots: the start and the end of every step."""
    sigmas = sigmas.to(x.device, x.dtype)
    next_sigmas = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
    trajectory = [x.cpu()]
    bar = tqdm(total=len(sigmas), desc=desc, unit="NFE", disable=quiet(progress), leave=False)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, next_sigmas)):
        x = _apply(known, x, sigma)
        x = step(i, x, denoised(net, x, sigma), sigma, sigma_next)
        bar.update(1)
        if return_trajectory:
            trajectory.append(x.cpu())
    bar.close()
    x = _apply(known, x, sigmas.new_zeros(()))
    return (x, torch.stack(trajectory)) if return_trajectory else x


def ode_slope(x: Tensor, D: Tensor, sigma: Tensor) -> Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE (EDM, eq. 4 with
    s(t) = 1, sigma(t) = t; k-diffusion's ``to_d``)."""
    return (x - D) / sigma


@torch.no_grad()
def euler(net: ScoreNet, x: Tensor, sigmas: Tensor, return_trajectory: bool = False,
          progress: bool = False, known: Known | None = None):
    """Euler steps along the probability-flow ODE, x <- x + (sigma_(i+1) - sigma_i)
    (x - D(x; sigma_i)) / sigma_i (k-diffusion's ``sample_euler`` with s_churn = 0; EDM,
    Algorithm 1 without its second-order correction). The last step, to sigma = 0, lands on
    D(x; sigma_(N-1)). ``x``: ``(B, ...)`` ~ N(0, sigma_0^2 I); ``sigmas``: ``(N,)``, largest
    first. NFE: N."""
    def step(i, x, D, sigma, sigma_next):
        return x + ode_slope(x, D, sigma) * (sigma_next - sigma)
    return _solve(net, x, sigmas, step, "euler", return_trajectory, progress, known)


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """k-diffusion's ``get_ancestral_step``: the level sigma_down the deterministic step goes
    to and the noise sigma_up added there, sigma_down^2 + sigma_up^2 = sigma_next^2, with
    sigma_up = min(sigma_next, eta sigma_next sqrt(sigma^2 - sigma_next^2) / sigma). At
    eta = 1 an Euler step to sigma_down plus sigma_up z is the Gaussian posterior
    q(x_(sigma_next) | x_sigma, x_0 = D): mean D + (sigma_next / sigma)^2 (x - D), variance
    sigma_up^2 (score SDE's ancestral sampling for SMLD, Song et al. 2021, Appendix F);
    eta = 0 is the Euler step."""
    if not eta:
        return sigma_next, sigma_next.new_zeros(())
    sigma_up = torch.minimum(
        sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


@torch.no_grad()
def euler_ancestral(net: ScoreNet, x: Tensor, sigmas: Tensor, eta: float = 1.0,
                    s_noise: float = 1.0, return_trajectory: bool = False,
                    progress: bool = False, known: Known | None = None):
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``): an
    Euler step from sigma_i to sigma_down, then s_noise sigma_up z, z ~ N(0, I)
    (:func:`ancestral_step`), except on the last step, to sigma = 0, where sigma_down = 0
    and no noise is drawn. The noise is :func:`randn_like`'s, one draw per step but the
    last, in k-diffusion's order. ``sigmas``: ``(N,)``, largest first. NFE: N."""
    def step(i, x, D, sigma, sigma_next):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + ode_slope(x, D, sigma) * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + randn_like(x) * s_noise * sigma_up
        return x
    return _solve(net, x, sigmas, step, "euler ancestral", return_trajectory, progress, known)


@torch.no_grad()
def dpmpp_2m(net: ScoreNet, x: Tensor, sigmas: Tensor, return_trajectory: bool = False,
             progress: bool = False, known: Known | None = None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) as k-diffusion's ``sample_dpmpp_2m``
    runs it. In lambda = -log sigma (the VE SDE: alpha = 1), h_i = lambda_(i+1) - lambda_i,

        x <- (sigma_(i+1) / sigma_i) x - (e^(-h_i) - 1) D',

    with D' = D_i at the first step (first order) and otherwise the multistep
    D' = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_(i-1), r_i = h_(i-1) / h_i. The paper's
    Algorithm 2 takes every step after the first with D'; the code takes the last one, to
    sigma = 0 (h = inf), at first order, which lands on D_(N-1).
    ``sigmas``: ``(N,)``, largest first. NFE: N."""
    previous: list[Tensor] = []                      # [lambda_(i-1), D_(i-1)]

    def step(i, x, D, sigma, sigma_next):
        t, t_next = -sigma.log(), -sigma_next.log()  # lambda_i, lambda_(i+1)
        h = t_next - t
        if not previous or sigma_next == 0:
            D_prime = D
        else:
            r = (t - previous[0]) / h
            D_prime = (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * previous[1]
        previous[:] = [t, D]
        return ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * D_prime
    return _solve(net, x, sigmas, step, "dpm-solver++(2m)", return_trajectory, progress, known)


@torch.no_grad()
def ipndm(net: ScoreNet, x: Tensor, sigmas: Tensor, max_order: int = 4,
          return_trajectory: bool = False, progress: bool = False, known: Known | None = None):
    """iPNDM (Zhang & Chen 2023, DEIS: the pseudo numerical method of Liu et al. 2022 with a
    lower-order multistep start instead of Runge-Kutta steps) as diff-sampler's
    ``ipndm_sampler`` runs it with ``denoise_to_zero``: Adams-Bashforth steps on the slope
    d_i = (x - D_i) / sigma_i, of order min(max_order, i + 1) with the fixed-step
    coefficients (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24 on every grid, and at the
    end x <- D(x; sigma_(N-1)) (the step to sigma = 0). ``sigmas``: ``(N,)`` the
    timestamps, largest first (diff-sampler's ``num_steps`` = N). NFE: N."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"iPNDM's max_order must be 1 to 4, got {max_order}")
    slopes: list[Tensor] = []                        # d_(i-1), d_(i-2), ... newest first

    def step(i, x, D, sigma, sigma_next):
        if sigma_next == 0:
            return D
        d, h = ode_slope(x, D, sigma), sigma_next - sigma
        order = min(max_order, i + 1)
        if order == 1:
            x = x + h * d
        elif order == 2:
            x = x + h * (3 * d - slopes[0]) / 2
        elif order == 3:
            x = x + h * (23 * d - 16 * slopes[0] + 5 * slopes[1]) / 12
        else:
            x = x + h * (55 * d - 59 * slopes[0] + 37 * slopes[1] - 9 * slopes[2]) / 24
        slopes[:] = [d, *slopes][:max_order - 1]
        return x
    return _solve(net, x, sigmas, step, "ipndm", return_trajectory, progress, known)


# ----------------------------------------------------------------------------- inpainting
class KnownValues:
    """The ``known(x, sigma)`` hook of the samplers above for inpainting: the known entries
    of ``x`` are set to y + sigma z, the data perturbed to the level the network is about
    to see (score SDE's ``get_pc_inpainter``); the rest is left to the sampler.

    ``fixed_noise=False`` draws z afresh at every call (score SDE's inpainter);
    ``fixed_noise=True`` draws it once, so that the known entries follow the smooth path
    y + sigma z (for the ODE). At sigma = 0 they are y exactly.

    ``y``: ``(B, ...)`` data in model space; ``mask``: broadcastable to ``y``, True = known.
    """

    def __init__(self, y: Tensor, mask: Tensor, fixed_noise: bool = False):
        self.where = mask.to(y.device).bool().expand_as(y)
        self.y_known = y[self.where]                                # (N_known,)
        self.z = torch.randn_like(self.y_known) if fixed_noise else None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        z = self.z if self.z is not None else torch.randn_like(self.y_known)
        return x.masked_scatter(self.where, self.y_known + sigma.to(x) * z)
