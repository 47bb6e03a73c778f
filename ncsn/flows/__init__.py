"""Normalizing flows (NICE, RealNVP, Glow): exact log p(x), exact samples, and the score by
autograd, so that a flow stands wherever a score network stands."""
from ncsn.flows.models import Flow, glow, nice, prior_log_prob, prior_sample, realnvp

__all__ = ["Flow", "glow", "nice", "prior_log_prob", "prior_sample", "realnvp"]
