"""Check ncsn-import against the authors' code: build the reference networks, save them as
their runners do (a list of state dicts under DataParallel's names, with the run's
config.yml dumped from an argparse.Namespace), import with ``ncsn-import``, and compare the
two networks' outputs on the same inputs (and, with ``--langevin``, the annealed Langevin
chains from the same seed and start).

The reference code is read at run time from checkouts given on the command line (export
the public repositories, e.g. ``git archive``); nothing of it is kept here.

    python scripts/check_reference.py --ncsn-ref /tmp/ncsn_ref --ncsnv2-ref /tmp/ncsnv2_ref
    python scripts/check_reference.py ... --full      # also ngf=128 at 32x32
    python scripts/check_reference.py ... --langevin  # also the sampler chains
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

# (label, layout, data section, model section, batch)
SMALL = [
    ("NCSN CondRefineNetDilated, ngf 8, 3x16x16", "ncsn",
     dict(dataset="CIFAR10", image_size=16, channels=3, logit_transform=False, random_flip=True),
     dict(sigma_begin=1.0, sigma_end=0.01, num_classes=10, batch_norm=False, ngf=8), 4),
    ("NCSN CondRefineNetDilated, ngf 8, 1x28x28 (MNIST)", "ncsn",
     dict(dataset="MNIST", image_size=28, channels=1, logit_transform=False, random_flip=False),
     dict(sigma_begin=1.0, sigma_end=0.01, num_classes=10, batch_norm=False, ngf=8), 4),
    ("NCSNv2, ngf 8, 3x16x16", "ncsnv2", dict(dataset="CIFAR10", image_size=16), dict(ngf=8), 4),
    ("NCSNv2, ngf 8, 3x16x16, rescaled", "ncsnv2",
     dict(dataset="CIFAR10", image_size=16, rescaled=True), dict(ngf=8), 4),
    ("NCSNv2Deeper, ngf 8, 3x16x16", "ncsnv2", dict(dataset="LSUN", image_size=16,
                                                   category="church_outdoor"), dict(ngf=8), 4),
    ("NCSNv2Deepest, ngf 8, 3x16x16", "ncsnv2", dict(dataset="FFHQ", image_size=16),
     dict(ngf=8), 4),
]
FULL = [
    ("NCSN CondRefineNetDilated, ngf 128, 3x32x32", "ncsn",
     dict(dataset="CIFAR10", image_size=32, channels=3, logit_transform=False, random_flip=True),
     dict(sigma_begin=1.0, sigma_end=0.01, num_classes=10, batch_norm=False, ngf=128), 2),
    ("NCSNv2, ngf 128, 3x32x32", "ncsnv2", dict(dataset="CIFAR10", image_size=32),
     dict(ngf=128), 2),
]


def ncsnv2_config(data: dict, model: dict) -> dict:
    """A config in the shape of ncsnv2's configs/cifar10.yml, with the given keys changed."""
    return {
        "training": {"batch_size": 128, "n_iters": 300001, "snapshot_freq": 5000,
                     "anneal_power": 2},
        "sampling": {"batch_size": 100, "data_init": False, "step_lr": 6.2e-6,
                     "n_steps_each": 5, "denoise": True},
        "data": {"dataset": "CIFAR10", "image_size": 32, "channels": 3, "logit_transform": False,
                 "uniform_dequantization": False, "gaussian_dequantization": False,
                 "random_flip": True, "rescaled": False, "num_workers": 4, **data},
        "model": {"sigma_begin": 50, "num_classes": 12, "ema": True, "ema_rate": 0.999,
                  "spec_norm": False, "sigma_dist": "geometric", "sigma_end": 0.01,
                  "normalization": "InstanceNorm++", "nonlinearity": "elu", "ngf": 128, **model},
        "optim": {"weight_decay": 0.0, "optimizer": "Adam", "lr": 1e-4, "beta1": 0.9,
                  "amsgrad": False, "eps": 1e-8},
    }


def ncsn_config(data: dict, model: dict) -> dict:
    """A config in the shape of ncsn's configs/anneal.yml."""
    return {"training": {"batch_size": 128, "n_epochs": 500000, "n_iters": 200001, "ngpu": 1,
                         "snapshot_freq": 5000, "algo": "dsm", "anneal_power": 2.0},
            "data": data, "model": model,
            "optim": {"weight_decay": 0.0, "optimizer": "Adam", "lr": 1e-3, "beta1": 0.9,
                      "amsgrad": False}}


def namespace(tree: dict) -> argparse.Namespace:
    """Nested dicts as nested namespaces, as both repositories' main.py build them."""
    return argparse.Namespace(**{k: namespace(v) if isinstance(v, dict) else v
                                 for k, v in tree.items()})


def reference_modules(root: Path, layout: str):
    """Import ``models`` (and its submodules) from one checkout; the two repositories use
    the same package name, so the previous one is dropped first."""
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        if layout == "ncsn":
            return importlib.import_module("models.cond_refinenet_dilated"), None
        return importlib.import_module("models.ncsnv2"), importlib.import_module("models")
    finally:
        sys.path.remove(str(root))


def build_reference(refs: dict, layout: str, config: argparse.Namespace):
    module, _ = reference_modules(refs[layout], layout)
    if layout == "ncsn":
        return module.CondRefineNetDilated(config)
    name = {"CIFAR10": "NCSNv2", "CELEBA": "NCSNv2", "LSUN": "NCSNv2Deeper",
            "FFHQ": "NCSNv2Deepest"}[config.data.dataset]
    return getattr(module, name)(config)


@torch.no_grad()
def perturb_(net: torch.nn.Module, std: float = 0.1) -> None:
    """Noise on the normalization parameters (initialised to constants, near-equal across
    levels), so that the order of gamma, alpha, beta and each level's row show in the
    output. The convolutions keep their random initialisation."""
    for name, p in net.named_parameters():
        if name.endswith(("embed.weight", "gamma", "alpha", "beta")):
            p.add_(std * torch.randn_like(p))


def save_reference_run(net, layout: str, tree: dict, folder: Path, step: int = 1234) -> tuple:
    """The runner's checkpoint list and config.yml (a yaml.dump of the Namespace)."""
    parallel = torch.nn.DataParallel(net)
    optimizer = torch.optim.Adam(parallel.parameters(), lr=1e-4)
    states = [parallel.state_dict(), optimizer.state_dict()]
    ema = None
    if layout == "ncsnv2":
        ema = {name: p.detach().clone() + 0.01 * torch.randn_like(p)
               for name, p in net.named_parameters()}          # a shadow that is not the model
        states += [3, step, ema]
    src = folder / (f"checkpoint_{step}.pth" if layout == "ncsnv2" else "checkpoint.pth")
    torch.save(states, src)
    config = folder / "config.yml"
    config.write_text(yaml.dump(namespace(tree), default_flow_style=False))
    return src, config, ema


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, both outputs finite."""
    if not (a.isfinite().all() and b.isfinite().all()):
        raise SystemExit("an output is not finite; the comparison would mean nothing")
    return float((a - b).abs().max() / b.abs().max())


def compare(label, layout, data, model, batch, refs, langevin=False) -> list[float]:
    from ncsn.checkpoint import load_checkpoint
    from ncsn.generate import model_from_checkpoint

    tree = (ncsn_config if layout == "ncsn" else ncsnv2_config)(data, model)
    config = namespace(tree)
    config.device = torch.device("cpu")
    torch.manual_seed(0)
    ref = build_reference(refs, layout, config)
    perturb_(ref)
    ref.eval()
    with tempfile.TemporaryDirectory() as tmp:
        src, yml, ema = save_reference_run(ref, layout, tree, Path(tmp))
        out = Path(tmp) / "imported.pt"
        done = subprocess.run([Path(sys.executable).parent / "ncsn-import", f"src={src}",
                               f"config={yml}", f"out={out}"], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{label}: ncsn-import failed: {done.stderr.strip()}")
        ckpt = load_checkpoint(out)
    ours = model_from_checkpoint(ckpt, use_ema=False)
    c, h, w = ckpt["data_shape"]
    x = torch.rand(batch, c, h, w)
    labels = torch.randint(0, len(ckpt["sigmas"]), (batch,))
    sigma = ckpt["sigmas"][labels]
    results = []
    with torch.no_grad():
        results.append(relative(ours(x, sigma), ref(x, labels)))
        torch.set_default_dtype(torch.float64)     # the reference's fusion sums start as zeros
        results.append(relative(ours.double()(x.double(), sigma.double()),
                                ref.double()(x.double(), labels)))
        torch.set_default_dtype(torch.float32)
        ours.float(), ref.float()
        if ema is not None:                        # from here on: the EMA weights
            ours = model_from_checkpoint(ckpt, use_ema=True)
            ref.load_state_dict({**ref.state_dict(), **ema})
            results.append(relative(ours(x, sigma), ref(x, labels)))
    line = f"{label:50s} float32 {results[0]:.2e}  float64 {results[1]:.2e}"
    if ema is not None:
        line += f"  EMA float32 {results[2]:.2e}"
    if langevin:
        diff, scale = chain_difference(refs, layout, ref, ours, ckpt)
        line += f"  Langevin max |diff| {diff:.2e} (max |x| {scale:.3g})"
    print(line, flush=True)
    return results


def chain_difference(refs, layout, ref, ours, ckpt) -> float:
    """The reference's anneal_Langevin_dynamics (ncsnv2's models/__init__.py) and ncsn's
    annealed_langevin from the same seed and start, on the imported network."""
    from ncsn.sampling import annealed_langevin

    _, package = reference_modules(refs["ncsnv2"], "ncsnv2")
    sampler = ckpt["config"]["sampler"]
    n_steps, step_lr = 2, sampler["step_lr"]
    x0 = torch.rand(3, *ckpt["data_shape"])
    torch.manual_seed(1)
    theirs = package.anneal_Langevin_dynamics(x0.clone(), ref, ckpt["sigmas"].numpy(), n_steps,
                                              step_lr, final_only=True,
                                              denoise=sampler["denoise"])[-1]
    torch.manual_seed(1)
    with torch.no_grad():
        mine = annealed_langevin(ours, x0.clone(), ckpt["sigmas"], step_lr, n_steps,
                                 denoise=sampler["denoise"])
    return float((mine - theirs).abs().max()), float(theirs.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ncsn-ref", type=Path, required=True,
                        help="a checkout of github.com/ermongroup/ncsn")
    parser.add_argument("--ncsnv2-ref", type=Path, required=True,
                        help="a checkout of github.com/ermongroup/ncsnv2")
    parser.add_argument("--full", action="store_true", help="also ngf=128 at 32x32")
    parser.add_argument("--langevin", action="store_true", help="also compare sampler chains")
    args = parser.parse_args()
    torch.set_num_threads(1)
    refs = {"ncsn": args.ncsn_ref, "ncsnv2": args.ncsnv2_ref}
    worst = 0.0
    for case in SMALL + (FULL if args.full else []):
        results = compare(*case, refs, langevin=args.langevin)
        worst = max(worst, results[0], *results[2:])
    print(f"largest float32 relative difference: {worst:.2e} (bound 1e-5)")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
