"""Check ncsn's EDM preconditioning and losses against NVlabs/edm's code: EDM's EDMPrecond and
VEPrecond (training/networks.py) and ncsn's (``model.precond=edm|ve``) around the same inner
function, and EDM's EDMLoss and VELoss (training/loss.py) and ncsn's (``loss=edm|ve_edm``)
from the same seed, so with the same sigma and noise. Prints the largest differences as a
Markdown table (docs/REPRODUCING.md keeps one).

EDM's code is read at run time from a checkout given on the command line (export the public
repository, e.g. ``git archive``); nothing of it is kept here. Its ``torch_utils.persistence``
decorator (pickling support, which needs dnnlib and requests) is replaced by a stub that
returns the class unchanged; nothing else of EDM's is altered.

    python scripts/check_edm.py --edm /tmp/edm
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from ncsn import losses, registry
from ncsn.nets.precond import EDMPrecond, VEPrecond
from ncsn.nets.unet import UNet
from ncsn.noise import geometric_sigmas

SHAPE = (3, 8, 8)
BATCH = 64
# sigma over EDM's sampling range (0.002 .. 80) and past both of its training ranges.
SIGMAS = torch.logspace(math.log10(1e-3), math.log10(200.0), 41)


def load_edm(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """EDM's training/networks.py and training/loss.py as modules, with a stub
    ``torch_utils.persistence`` whose ``persistent_class`` returns the class as it is."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence = persistence
    sys.modules.update({"torch_utils": torch_utils, "torch_utils.persistence": persistence})
    modules = []
    for name in ("networks", "loss"):
        path = root / "training" / f"{name}.py"
        if not path.is_file():
            sys.exit(f"check_edm: {path} not found; --edm takes a checkout of NVlabs/edm")
        spec = importlib.util.spec_from_file_location(f"edm_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


class Tiny(nn.Module):
    """An inner model in EDM's interface, ``model(x, noise_labels, class_labels)``: a
    convolution of x gated by an MLP of c_noise, so that D depends on every coefficient."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.gate = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, out_channels))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        gate = self.gate(noise_labels[:, None].to(x.dtype))[:, :, None, None]
        return self.conv(x) * (1 + gate) + gate


class Probe(nn.Module):
    """EDM's interface; records its input and c_noise and returns ``value`` everywhere."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, **kwargs):
        super().__init__()
        self.value, self.seen = 0.0, None

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = (x, noise_labels)
        return torch.full_like(x, self.value)


class NcsnUNet(nn.Module):
    """ncsn's U-Net as EDM's inner model: G(x, c) = UNet(x, exp(c)), the function of c_noise
    that ncsn's wrapper makes of it (ncsn/nets/precond.py)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, **kwargs):
        super().__init__()
        self.unet = UNet((in_channels, img_resolution, img_resolution), ch=16, ch_mult=[1, 2],
                         num_res_blocks=1, attn_resolutions=[4], dropout=0.0,
                         scale_by_sigma=False)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return self.unet(x, noise_labels.exp())


class OfSigma(nn.Module):
    """An EDM inner model ``G(x, c)`` as ncsn's networks are called: ``F(x, sigma) =
    G(x, log sigma)``, so that ncsn's wrapper, which passes exp(c_noise), gives G c_noise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, sigma):
        return self.model(x, sigma.log())


def edm_precond(networks, kind: str, model_type: str) -> nn.Module:
    cls = {"edm": networks.EDMPrecond, "ve": networks.VEPrecond}[kind]
    return cls(img_resolution=SHAPE[1], img_channels=SHAPE[0], model_type=model_type)


def ours_around(edm_net: nn.Module, kind: str) -> nn.Module:
    inner = OfSigma(edm_net.model)                           # the same module, the same weights
    return EDMPrecond(inner, sigma_data=0.5) if kind == "edm" else VEPrecond(inner)


def edm_coefficients(networks, kind: str, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """c_skip, c_out, c_in and c_noise as EDM's forward computes them, read off its output:
    with F = 0, D = c_skip x; with F = 1, D - c_skip x = c_out; the probe sees c_in x and
    c_noise. x = 1 everywhere."""
    net = edm_precond(networks, kind, "Probe")
    x = torch.ones(len(sigma), *SHAPE)
    with torch.no_grad():
        net.model.value = 0.0
        c_skip = net(x, sigma)[:, 0, 0, 0]
        c_in, c_noise = net.model.seen[0][:, 0, 0, 0], net.model.seen[1]
        net.model.value = 1.0
        c_out = net(x, sigma)[:, 0, 0, 0] - c_skip
    return {"c_skip": c_skip, "c_out": c_out, "c_in": c_in, "c_noise": c_noise}


def ours_coefficients(kind: str, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    ours = EDMPrecond(nn.Identity(), 0.5) if kind == "edm" else VEPrecond(nn.Identity())
    return {name: getattr(ours, name)(sigma) for name in ("c_skip", "c_out", "c_in", "c_noise")}


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """max |a - b| and max |a - b| / max |b|."""
    diff = (a.double() - b.double()).abs().max().item()
    return diff, diff / max(b.double().abs().max().item(), 1e-30)


def check_precond(networks, kind: str, rows: list) -> None:
    edm_c, ours_c = edm_coefficients(networks, kind, SIGMAS), ours_coefficients(kind, SIGMAS)
    for name in edm_c:
        rows.append((f"{kind}: {name}(sigma), {len(SIGMAS)} sigmas 1e-3..200",
                     *difference(ours_c[name], edm_c[name])))
    torch.manual_seed(0)
    for model_type in ("Tiny", "NcsnUNet"):
        edm_net = edm_precond(networks, kind, model_type)
        ours = ours_around(edm_net, kind)
        sigma = SIGMAS.repeat(2)
        y = torch.randn(len(sigma), *SHAPE) * 0.5
        x = y + torch.randn(len(sigma), *SHAPE) * sigma[:, None, None, None]
        with torch.no_grad():
            D_edm, D_ours = edm_net(x, sigma), ours.denoise(x, sigma)
            score_ours = ours(x, sigma)
        rows.append((f"{kind}: D(x; sigma), {model_type} inner model",
                     *difference(D_ours, D_edm)))
        score_edm = (D_edm - x) / sigma[:, None, None, None] ** 2
        rows.append((f"{kind}: score (D - x) / sigma^2, {model_type}",
                     *difference(score_ours, score_edm)))


def objective(loss_name: str, model_kind: str):
    loss_cfg = OmegaConf.create({"edm": {"name": "edm", "P_mean": -1.2, "P_std": 1.2,
                                         "sigma_data": 0.5},
                                 "ve_edm": {"name": "ve_edm", "sigma_min": 0.02,
                                            "sigma_max": 100.0}}[loss_name])
    model_cfg = OmegaConf.create({"name": "unet", "precond": model_kind,
                                  "scale_by_sigma": False})
    return registry.build_objective(loss_cfg, model_cfg, geometric_sigmas(80.0, 0.002, 18))


def check_loss(networks, edm_losses, loss_name: str, kind: str, rows: list) -> None:
    edm_loss = edm_losses.EDMLoss() if loss_name == "edm" else edm_losses.VELoss()
    torch.manual_seed(1)
    edm_net = edm_precond(networks, kind, "Tiny")
    ours = ours_around(edm_net, kind)
    y = torch.rand(BATCH, *SHAPE) * 2 - 1                    # images in [-1, 1], as EDM's loop
    seed = 2
    torch.manual_seed(seed)
    reference = edm_loss(net=edm_net, images=y, labels=None)  # (B, C, H, W), per element
    torch.manual_seed(seed)
    per_sample, _ = objective(loss_name, kind)(ours, y)      # (B,)
    rows.append((f"loss={loss_name} (model.precond={kind}): per-sample loss, batch {BATCH}",
                 *difference(per_sample, reference.flatten(1).sum(1))))
    # EDM's loop: loss.sum() / batch; ncsn's step: the per-sample mean. Same gradient.
    params = list(edm_net.model.parameters())
    grads_edm = torch.autograd.grad(reference.sum() / BATCH, params)
    grads_ours = torch.autograd.grad(per_sample.mean(), params)
    rows.append((f"loss={loss_name}: gradient of the batch loss",
                 *difference(torch.cat([g.flatten() for g in grads_ours]),
                             torch.cat([g.flatten() for g in grads_edm]))))
    torch.manual_seed(seed)
    if loss_name == "edm":
        edm_sigma = (torch.randn([BATCH, 1, 1, 1]) * 1.2 - 1.2).exp().flatten()
        torch.manual_seed(seed)
        our_sigma = losses.edm_sigmas(BATCH, -1.2, 1.2, y)
    else:
        edm_sigma = (0.02 * ((100 / 0.02) ** torch.rand([BATCH, 1, 1, 1]))).flatten()
        torch.manual_seed(seed)
        our_sigma = losses.ve_sigmas(BATCH, 0.02, 100.0, y)
    rows.append((f"loss={loss_name}: sigma drawn from the same seed",
                 *difference(our_sigma, edm_sigma)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edm", type=Path, required=True, help="a checkout of NVlabs/edm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    networks, edm_losses = load_edm(args.edm)
    networks.Tiny, networks.Probe, networks.NcsnUNet = Tiny, Probe, NcsnUNet
    rows: list = []
    for kind in ("edm", "ve"):
        check_precond(networks, kind, rows)
    check_loss(networks, edm_losses, "edm", "edm", rows)
    check_loss(networks, edm_losses, "ve_edm", "ve", rows)
    print("| compared (float32) | max abs difference | relative (to EDM's max abs value) |")
    print("|---|---|---|")
    for name, diff, rel in rows:
        print(f"| {name} | {diff:.2g} | {rel:.2g} |")


if __name__ == "__main__":
    main()
