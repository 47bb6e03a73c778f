"""EDM's preconditioning (Karras et al. 2022, Sec. 5, eq. 7 and Table 1) around any network
that takes sigma's value: the denoiser

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

with NVlabs/edm's ``EDMPrecond`` (``model.precond=edm``) or ``VEPrecond``
(``model.precond=ve``) coefficients (training/networks.py). The wrapped module still follows
ncsn's convention: ``net(x, sigma)`` returns the score s(x, sigma) = (D(x; sigma) - x) / sigma^2
(Tweedie; EDM eq. 3), and ``net.denoise(x, sigma)`` returns D itself.

What the inner network is given. EDM's inner model takes c_noise; ncsn's networks take sigma
and condition on log sigma (unet's and cond_mlp's embeddings) or on sigma (ncsnv2's output
divided by it). The inner network is called with sigma_in = exp(c_noise), so that
log sigma_in = c_noise (to float rounding): a network that embeds log sigma embeds EDM's
c_noise, and any ncsn network F(x, sigma_in) is the function G(x, c) = F(x, exp(c)) of
c_noise. When EDM's model is that same G, D here is EDM's D (scripts/check_edm.py compares
the two). ncsnv2, whose only conditioning is its output divided by sigma, is then
R(c_in x) / exp(c_noise). A network's own division by sigma (``model.scale_by_sigma``) would
come on top of c_out and is refused.

Checkpoints: the inner network is registered as ``net``, so its weights are under ``net.``;
a run without preconditioning (``model.precond=none``, the default and every run before the
key existed) builds no wrapper and keeps its keys unchanged.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ncsn.losses import augment_keywords
from ncsn.parts import Network

PRECONDITIONINGS = ("none", "edm", "ve")
PRECOND_KEYS = ("precond", "sigma_data")       # model keys for the wrapper, not the network


def _broadcast(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))    # (B, 1, ..., 1)


class Preconditioned(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; exp(c_noise)) around ``net`` (EDM, eq. 7);
    called as ``(x, sigma)``, ``x`` of shape ``(B, ...)`` and ``sigma`` of shape ``(B,)``, it
    returns the score (D - x) / sigma^2 of ``x``'s shape. Subclasses give the coefficients as
    functions of sigma (any shape)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def c_skip(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def c_out(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def c_in(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def c_noise(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def denoise(self, x: Tensor, sigma: Tensor, augment_labels: Tensor | None = None) -> Tensor:
        """EDM's D(x; sigma), of ``x``'s shape; ``augment_labels`` ``(B, augment_dim)``, in
        training with EDM's augmentation only, reach the inner network (:mod:`ncsn.augment`)."""
        s = _broadcast(sigma, x)
        F_x = self.net(self.c_in(s) * x, self.c_noise(sigma).exp(),
                       **augment_keywords(augment_labels))
        return self.c_skip(s) * x + self.c_out(s) * F_x.to(x.dtype)

    def forward(self, x: Tensor, sigma: Tensor, augment_labels: Tensor | None = None) -> Tensor:
        # EDM, eq. 3: grad_x log p(x; sigma) = (D(x; sigma) - x) / sigma^2
        return (self.denoise(x, sigma, augment_labels) - x) / _broadcast(sigma, x) ** 2


class EDMPrecond(Preconditioned):
    """EDM's own preconditioning (Table 1, "Ours"; training/networks.py EDMPrecond): unit
    variance of the network's input and of its training target for data of standard
    deviation ``sigma_data``."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__(net)
        self.sigma_data = sigma_data

    def c_skip(self, sigma):
        return self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)

    def c_out(self, sigma):
        return sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()

    def c_in(self, sigma):
        return 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt()

    def c_noise(self, sigma):
        return sigma.log() / 4


class VEPrecond(Preconditioned):
    """The variance-exploding preconditioning (score SDE's NCSN++, Table 1, "VE";
    training/networks.py VEPrecond): D = x + sigma F(x; log(sigma / 2))."""

    def c_skip(self, sigma):
        return torch.ones_like(sigma)

    def c_out(self, sigma):
        return sigma

    def c_in(self, sigma):
        return torch.ones_like(sigma)

    def c_noise(self, sigma):
        # EDM's code: log(0.5 sigma). Table 1 prints ln(sigma / 2) (the same).
        return (0.5 * sigma).log()


def precond_problems(model_cfg, network: Network) -> list[str]:
    """Every way ``model_cfg.precond`` cannot wrap ``network`` (what ``model_cfg`` builds),
    one message each."""
    kind = model_cfg.get("precond", "none")
    if kind not in PRECONDITIONINGS:
        return [f"model.precond must be one of {', '.join(PRECONDITIONINGS)}, got {kind!r}"]
    if kind == "none":
        return []
    if not network.takes_sigma_values:
        return [f"model.precond={kind} feeds the network exp(c_noise), not the table's sigmas, "
                f"but {network.table_only}; choose {network.alternative}, or model.precond=none"]
    if model_cfg.get("scale_by_sigma", False):
        return [f"model.precond={kind} scales the network's output by c_out(sigma) (EDM eq. 7); "
                f"model.scale_by_sigma=true would divide it by exp(c_noise) besides; set "
                f"model.scale_by_sigma=false"]
    if kind == "edm" and not model_cfg.get("sigma_data", 0.5) > 0:
        return [f"model.sigma_data must be positive, got {model_cfg.sigma_data}"]
    return []


def precondition(net: nn.Module, model_cfg) -> nn.Module:
    """``net`` wrapped as ``model_cfg.precond`` says (none: ``net`` itself)."""
    kind = model_cfg.get("precond", "none")
    if kind == "edm":
        return EDMPrecond(net, float(model_cfg.get("sigma_data", 0.5)))
    if kind == "ve":
        return VEPrecond(net)
    return net


def network_config(model_cfg):
    """``model_cfg`` without the wrapper's keys (``PRECOND_KEYS``): what the network itself
    is built from."""
    fields = OmegaConf.to_container(model_cfg, resolve=True) \
        if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    return OmegaConf.create({k: v for k, v in fields.items() if k not in PRECOND_KEYS})
