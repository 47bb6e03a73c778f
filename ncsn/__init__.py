"""ncsn: score-based generative models (NCSN, NCSNv2), score-matching objectives and
Langevin samplers, usable from a notebook without Hydra.

    import ncsn
    sigmas = ncsn.geometric_sigmas(1.0, 0.01, 10)
    loss = ncsn.anneal_dsm(net, x, sigmas)                 # net(x, sigma) -> score
    x = ncsn.annealed_langevin(net, x0, sigmas, step_lr=2e-5, n_steps_each=100)
    x = ncsn.heun(net, x0 * sigmas[0], ncsn.edm_sigmas(1.0, 0.01, 18))   # 35 evaluations
    x = ncsn.dpmpp_2m(net, x0 * sigmas[0], ncsn.edm_sigmas(1.0, 0.01, 10))  # 10 evaluations
    ll = ncsn.log_likelihood(net, x, sigma_min=0.01, sigma_max=1.0)     # nats per sample
    with ncsn.per_sample_noise(seed=0, indices=range(8)):    # chain i: its own generator
        x = ncsn.annealed_langevin(net, x0, sigmas, step_lr=2e-5, n_steps_each=100)
"""
from ncsn.data.toy import GaussianMixture, make_toy
from ncsn.losses import (anneal_dsm, annealed, denoising_score_matching, score_matching,
                         sliced_score_matching)
from ncsn.nets.mlp import ConditionalMLP, ScoreMLP
from ncsn.noise import geometric_sigmas, largest_pairwise_distance, num_scales_for
from ncsn.image_sampling import inpaint, interpolate, make_mask
from ncsn.likelihood import bits_per_dim, log_likelihood
from ncsn.sampling import (CountingNet, annealed_langevin, dpmpp_2m, edm_sigmas, euler,
                           euler_ancestral, heun, ipndm, langevin, ncsnv2_step_lr,
                           per_sample_noise, predictor_corrector, probability_flow)

__version__ = "0.1.0"

__all__ = [
    "GaussianMixture", "make_toy",
    "score_matching", "sliced_score_matching", "denoising_score_matching", "anneal_dsm",
    "annealed",
    "ScoreMLP", "ConditionalMLP",
    "geometric_sigmas", "largest_pairwise_distance", "num_scales_for",
    "langevin", "annealed_langevin", "ncsnv2_step_lr",
    "predictor_corrector", "probability_flow", "heun", "edm_sigmas", "CountingNet",
    "euler", "euler_ancestral", "dpmpp_2m", "ipndm",
    "per_sample_noise",
    "log_likelihood", "bits_per_dim",
    "inpaint", "interpolate", "make_mask",
]
