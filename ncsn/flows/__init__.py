"""Normalizing flows (NICE, RealNVP, Glow): exact log p(x), exact samples, and the score by
autograd, so that a flow stands wherever a score network stands."""
from ncsn.flows.models import (ExactSample, Flow, LogDensity, nice, prior_from_normal,
                               prior_log_prob, prior_sample)
from ncsn.flows.glow import glow      # the builder; "from ncsn.flows.glow import X" still works
from ncsn.flows.realnvp import realnvp  # the function: ``ncsn.flows.realnvp`` names it, not the module
from ncsn.flows.objective import (FLOW_MODELS, exact_samples, negative_log_likelihood,
                                  pixel_levels)

__all__ = ["ExactSample", "FLOW_MODELS", "Flow", "LogDensity", "exact_samples", "glow",
           "negative_log_likelihood", "nice", "pixel_levels", "prior_from_normal",
           "prior_log_prob", "prior_sample", "realnvp"]
