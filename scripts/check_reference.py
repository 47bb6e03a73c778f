"""Check ncsn-import against the authors' code: build the reference networks, save them as
their runners do (a list of state dicts under DataParallel's names, with the run's
config.yml dumped from an argparse.Namespace), import with ``ncsn-import``, and compare the
two networks' outputs on the same inputs (and, with ``--langevin``, the annealed Langevin
chains from the same seed and start).

The reference code is read at run time from checkouts given on the command line (export
the public repositories, e.g. ``git archive``); nothing of it is kept here.

With ``--score-sde-ref`` it also builds score_sde_pytorch's NCSN++ in each layout, maps its
state dict onto ncsn's NCSNpp (:func:`ncsn.nets.ncsnpp.from_score_sde`) and compares the two
on the same inputs and sigma; and it saves score_sde's NCSNpp as its run_lib does (with its
EMA), imports the file with ``ncsn-import format=score_sde`` and compares the scores of
score_sde's ``get_score_fn`` and ncsn's network, raw and EMA weights. score_sde's ``op`` package compiles a CUDA extension at import;
this script gives it the package's own CPU path instead (``upfirdn2d_native``), so a plain
checkout runs on a CPU.

    python scripts/check_reference.py --ncsn-ref /tmp/ncsn_ref --ncsnv2-ref /tmp/ncsnv2_ref
    python scripts/check_reference.py ... --full      # also ngf=128 at 32x32 (nf=128: NCSN++)
    python scripts/check_reference.py ... --langevin  # also the sampler chains
    python scripts/check_reference.py --score-sde-ref /tmp/score_sde [--full] [--count]
"""
from __future__ import annotations

import argparse
import ast
import importlib
import math
import types
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


# ----------------------------------------------------------------------------- NCSN++
# score_sde's configs/ve/cifar10_ncsnpp_continuous.py (with default_cifar10_configs.py):
# its model section; each case below changes some keys.
NCSNPP_CIFAR10 = dict(
    name="ncsnpp", scale_by_sigma=True, normalization="GroupNorm", nonlinearity="swish",
    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
    resamp_with_conv=True, conditional=True, fir=True, fir_kernel=[1, 3, 3, 1],
    skip_rescale=True, resblock_type="biggan", progressive="none",
    progressive_input="residual", progressive_combine="sum", attention_type="ddpm",
    init_scale=0.0, fourier_scale=16, conv_size=3, embedding_type="fourier", dropout=0.1,
    sigma_min=0.01, sigma_max=50, num_scales=1000)
# configs/ve/cifar10_ncsnpp_deep_continuous.py
NCSNPP_DEEP = dict(num_res_blocks=8)
# configs/ve/celebahq_256_ncsnpp_continuous.py (church, bedroom, ffhq_256: sigma_max aside,
# the same network), with default_lsun_configs.py
NCSNPP_256 = dict(ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, progressive="output_skip",
                  progressive_input="input_skip", dropout=0.0, sigma_max=348, num_scales=2000)
# configs/ve/ffhq_ncsnpp_continuous.py and celebahq_ncsnpp_continuous.py (1024 px)
NCSNPP_1024 = dict(nf=16, ch_mult=(1, 2, 4, 8, 16, 32, 32, 32), num_res_blocks=1,
                   progressive="output_skip", progressive_input="input_skip", dropout=0.0,
                   sigma_max=1348, num_scales=2000)

# (label, image size, changes to NCSNPP_CIFAR10, data.centered, batch)
NCSNPP_SMALL = [
    ("NCSN++ CIFAR-10 layout, nf 8, 3x16x16", 16,
     dict(nf=8, attn_resolutions=(8,)), False, 3),
    ("NCSN++ deep CIFAR-10 layout, nf 8, 3x16x16", 16,
     dict(NCSNPP_DEEP, nf=8, attn_resolutions=(8,)), False, 3),
    ("NCSN++ 256 px layout, nf 8, 3x64x64", 64,
     dict(NCSNPP_256, nf=8, attn_resolutions=(16,)), False, 2),
    ("NCSN++ 1024 px layout, nf 4, 3x128x128", 128,
     dict(NCSNPP_1024, nf=4, attn_resolutions=(16,)), False, 1),
    ("NCSN++ ddpm blocks, FIR, positional", 16,
     dict(nf=8, num_res_blocks=2, attn_resolutions=(8,), resblock_type="ddpm",
          resamp_with_conv=False, embedding_type="positional", sigma_max=1.0,
          num_scales=10), False, 3),
    ("NCSN++ ddpm blocks, no FIR, output residual (*)", 16,
     dict(nf=8, num_res_blocks=2, attn_resolutions=(8,), resblock_type="ddpm",
          progressive="residual", fir=False), False, 3),
    ("NCSN++ ddpm blocks, FIR convs, input_skip cat (*)", 16,
     dict(nf=8, num_res_blocks=1, attn_resolutions=(4,), resblock_type="ddpm",
          progressive="residual", progressive_input="input_skip", progressive_combine="cat",
          skip_rescale=False), False, 3),
    ("NCSN++ ddpm blocks, no FIR, no conv, no pyramids (*)", 16,
     dict(nf=8, num_res_blocks=1, attn_resolutions=(), resblock_type="ddpm",
          resamp_with_conv=False, progressive_input="none", fir=False), False, 3),
    ("NCSN++ biggan, no FIR, output_skip, centered, unscaled (*)", 16,
     dict(nf=8, num_res_blocks=1, attn_resolutions=(16, 4), fir=False, skip_rescale=False,
          progressive="output_skip", init_scale=0.1, scale_by_sigma=False), True, 3),
]
NCSNPP_FULL = [
    ("NCSN++ CIFAR-10, nf 128, 3x32x32", 32, {}, False, 2),
    ("NCSN++ deep CIFAR-10, nf 128, 3x32x32", 32, NCSNPP_DEEP, False, 2),
]


def function_source(path: Path, name: str) -> str:
    """The source of the top-level function ``name`` of the file ``path``."""
    source = path.read_text()
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(source, node)


# Slips in score_sde_pytorch's port that stop two layers from running (the released VE
# configurations reach neither); the cases marked (*) need them repaired:
# file -> [(text, repaired text)]
SCORE_SDE_REPAIRS = {
    # upsample_conv_2d (StyleGAN2's fused upsampling convolution) flips the kernel by
    # slicing with negative steps, which torch refuses, and passes TensorFlow's 4-entry
    # strides (and an output padding computed from their first entry) to torch
    "models/up_or_down_sampling.py": [
        ("w[..., ::-1, ::-1]", "torch.flip(w, [3, 4])"),
        ("F.conv_transpose2d(x, w, stride=stride, output_padding=output_padding, padding=0)",
         "F.conv_transpose2d(x, w, stride=factor, padding=0)")],
    # Upsample (no FIR) passes 'nearest' as interpolate's scale_factor, next to a size
    "models/layerspp.py": [("F.interpolate(x, (H * 2, W * 2), 'nearest')",
                            "F.interpolate(x, (H * 2, W * 2), mode='nearest')")],
}


def score_sde_models(root: Path) -> types.ModuleType:
    """score_sde's ``models.ncsnpp``, importable on a CPU: its ``op`` package (a CUDA
    extension compiled at import) stands in as the package's own CPU path
    (``upfirdn2d_native``, what its ``upfirdn2d`` runs on CPU tensors), and the modules in
    ``SCORE_SDE_REPAIRS`` are loaded with those repairs."""
    namespace_ = {"torch": torch, "F": torch.nn.functional}
    exec(function_source(root / "op" / "upfirdn2d.py", "upfirdn2d_native"), namespace_)
    native = namespace_["upfirdn2d_native"]
    op = types.ModuleType("op")
    op.upfirdn2d = lambda x, kernel, up=1, down=1, pad=(0, 0): native(     # op's CPU branch
        x, kernel, up, up, down, down, pad[0], pad[1], pad[0], pad[1])
    sys.modules["op"] = op
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        package = importlib.import_module("models")
        for relative_path, repairs in SCORE_SDE_REPAIRS.items():   # in import order
            source = (root / relative_path).read_text()
            for text, repaired in repairs:
                if source.count(text) != 1:
                    raise SystemExit(f"{relative_path}: expected {text!r} once; another "
                                     f"version of score_sde_pytorch?")
                source = source.replace(text, repaired)
            name = "models." + Path(relative_path).stem
            module = types.ModuleType(name)
            module.__file__, module.__package__ = str(root / relative_path), "models"
            sys.modules[name] = module
            setattr(package, Path(relative_path).stem, module)
            exec(compile(source, module.__file__, "exec"), module.__dict__)
        return importlib.import_module("models.ncsnpp")
    finally:
        sys.path.remove(str(root))


def ncsnpp_reference_config(model: dict, size: int, centered: bool) -> argparse.Namespace:
    """The keys score_sde's NCSNpp reads, as attributes (its ml_collections.ConfigDict)."""
    return namespace({"model": model, "training": {"continuous": True},
                      "data": {"image_size": size, "num_channels": 3, "centered": centered}})


def ncsnpp_fields(model: dict, centered: bool) -> dict:
    """NCSNpp's arguments for a score_sde model section."""
    from ncsn.nets.ncsnpp import NCSNppConfig

    names = [f for f in NCSNppConfig.__dataclass_fields__
             if f not in ("name", "centered", "precond", "sigma_data")]
    return {**{f: list(model[f]) if isinstance(model[f], tuple) else model[f] for f in names},
            "centered": centered}


def ncsnpp_sigmas(model: dict) -> torch.Tensor:
    from ncsn.noise import geometric_sigmas

    return geometric_sigmas(model["sigma_max"], model["sigma_min"], model["num_scales"])


def compare_ncsnpp(score_sde, label, size, changes, centered, batch) -> float:
    """Build score_sde's NCSNpp, map its state dict onto ours, compare the outputs."""
    from ncsn.nets.ncsnpp import NCSNpp, from_score_sde, score_sde_keys

    model = {**NCSNPP_CIFAR10, **changes}
    torch.manual_seed(0)
    ref = score_sde.NCSNpp(ncsnpp_reference_config(model, size, centered))
    with torch.no_grad():                        # the 1e-10 branches would hide everything
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval()
    sigmas = ncsnpp_sigmas(model)
    ours = NCSNpp((3, size, size), sigmas, **ncsnpp_fields(model, centered)).eval()
    state = ref.state_dict()
    positional = model["embedding_type"] == "positional"
    in_order = list(score_sde_keys(ours)) == [k for k in state if positional or k != "sigmas"]
    ours.load_state_dict(from_score_sde(state, ours))
    x = torch.rand(batch, 3, size, size)
    x = 2 * x - 1 if centered else x
    if positional:
        labels = torch.randint(0, len(sigmas), (batch,))
        sigma, condition = sigmas[labels], labels
    else:
        log_min, log_max = math.log(model["sigma_min"]), math.log(model["sigma_max"])
        sigma = torch.exp(log_min + (log_max - log_min) * torch.rand(batch))
        condition = sigma
    with torch.no_grad():
        mine, theirs = ours(x, sigma), ref(x, condition).float()
    if not (mine.isfinite().all() and theirs.isfinite().all()):
        raise SystemExit(f"{label}: an output is not finite; the comparison would mean nothing")
    difference = float((mine - theirs).abs().max())
    scale = float(theirs.abs().max())
    print(f"{label:60s} max|diff| {difference:.2e}  max|out| {scale:.3g}  relative "
          f"{difference / scale:.2e}  keys in score_sde's order: {in_order}", flush=True)
    if not in_order:
        raise SystemExit(f"{label}: score_sde_keys does not list score_sde's keys in order")
    return difference / scale


def count_ncsnpp(score_sde) -> None:
    """Parameters of score_sde's full configurations: its network against ours."""
    from ncsn.nets.ncsnpp import NCSNpp

    print(f"{'configuration':34s} {'score_sde':>12s} {'ncsn':>12s}")
    for label, size, changes in [("cifar10_ncsnpp_continuous", 32, {}),
                                 ("cifar10_ncsnpp_deep_continuous", 32, NCSNPP_DEEP),
                                 ("celebahq_256_ncsnpp_continuous", 256, NCSNPP_256),
                                 ("ffhq_ncsnpp_continuous (1024)", 1024, NCSNPP_1024)]:
        model = {**NCSNPP_CIFAR10, **changes}
        theirs = sum(p.numel() for p in score_sde.NCSNpp(
            ncsnpp_reference_config(model, size, False)).parameters() if p.requires_grad)
        with torch.device("meta"):
            ours = sum(p.numel() for p in NCSNpp((3, size, size), ncsnpp_sigmas(model),
                                                 **ncsnpp_fields(model, False)).parameters())
        print(f"{label:34s} {theirs:12,d} {ours:12,d}", flush=True)


# (label, image size, changes to NCSNPP_CIFAR10, the released configuration whose other
# sections the config file takes, batch): checkpoints written by run_lib's save_checkpoint
NCSNPP_CHECKPOINTS = [
    ("score_sde checkpoint, CIFAR-10 layout, nf 8, 3x16x16", 16,
     dict(nf=8, attn_resolutions=(8,), num_scales=10), "ve/cifar10_ncsnpp_continuous", 3),
    ("score_sde checkpoint, 256 px layout, nf 8, 3x64x64", 64,
     dict(NCSNPP_256, nf=8, attn_resolutions=(16,), num_scales=10),
     "ve/church_ncsnpp_continuous", 2),
    ("score_sde checkpoint, positional (discrete), nf 8, 3x16x16", 16,
     dict(nf=8, attn_resolutions=(8,), embedding_type="positional", num_scales=10),
     "ve/cifar10_ncsnpp", 3),
]


def score_sde_runtime(root: Path) -> types.SimpleNamespace:
    """score_sde's EMA class (models/ema.py), ``get_score_fn`` (models/utils.py), VESDE
    (sde_lib.py) and ``save_checkpoint`` (utils.py, read alone: the file imports
    TensorFlow for its ``restore_checkpoint``)."""
    sys.path.insert(0, str(root))
    try:
        ema = importlib.import_module("models.ema")
        mutils = importlib.import_module("models.utils")
        sde_lib = importlib.import_module("sde_lib")
    finally:
        sys.path.remove(str(root))
    namespace_ = {"torch": torch}
    exec(function_source(root / "utils.py", "save_checkpoint"), namespace_)
    return types.SimpleNamespace(EMA=ema.ExponentialMovingAverage, get_score_fn=mutils.get_score_fn,
                                 VESDE=sde_lib.VESDE, save_checkpoint=namespace_["save_checkpoint"])


def plain(tree):
    """Tuples as lists, for a YAML file."""
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    return [plain(v) for v in tree] if isinstance(tree, (tuple, list)) else tree


def compare_score_sde_checkpoint(score_sde, runtime, label, size, changes, released,
                                 batch) -> float:
    """score_sde's NCSNpp trained for one step under its EMA, saved by run_lib's
    save_checkpoint, imported by ``ncsn-import format=score_sde`` with a config file of the
    same fields; the two scores (get_score_fn) on the same images and t, raw and EMA."""
    from ncsn.checkpoint import load_checkpoint
    from ncsn.generate import model_from_checkpoint
    from ncsn.reference_sde import SCORE_SDE_CONFIGS

    model = {**NCSNPP_CIFAR10, "ema_rate": 0.999, **changes}
    continuous = model["embedding_type"] == "fourier"
    tree = plain({**SCORE_SDE_CONFIGS[released], "model": model})
    tree["data"] = {**tree["data"], "image_size": size, "centered": False}
    tree["training"] = {**tree["training"], "continuous": continuous}
    config = namespace(tree)
    torch.manual_seed(0)
    net = torch.nn.DataParallel(score_sde.NCSNpp(config))     # run_lib's "module." names
    with torch.no_grad():                        # the 1e-10 branches would hide everything
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = runtime.EMA(net.parameters(), decay=model["ema_rate"])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.rand(batch, 3, size, size)                     # data in [0, 1]
    net(x, torch.full((batch,), 1.0) if continuous else torch.zeros(batch).long()).square(
        ).mean().backward()
    optimizer.step()                             # a step, so that the EMA differs from the model
    ema.update(net.parameters())
    sde = runtime.VESDE(model["sigma_min"], model["sigma_max"], model["num_scales"])
    t = torch.rand(batch) * (1 - 1e-5) + 1e-5
    with tempfile.TemporaryDirectory() as tmp:
        src, yml, out = (Path(tmp) / n for n in ("checkpoint_2.pth", "config.yaml", "out.pt"))
        runtime.save_checkpoint(str(src), dict(optimizer=optimizer, model=net, ema=ema, step=2))
        yml.write_text(yaml.safe_dump(tree))
        done = subprocess.run([Path(sys.executable).parent / "ncsn-import", f"src={src}",
                               "format=score_sde", f"config={yml}", f"out={out}"],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{label}: ncsn-import failed: {done.stderr.strip()}")
        ckpt = load_checkpoint(out)
    if continuous:                              # get_score_fn: labels = marginal std = sigma
        sigma = sde.marginal_prob(torch.zeros_like(x), t)[1]
    else:                                       # labels = round((T - t)(N - 1)), a table index
        sigma = ckpt["sigmas"][torch.round((sde.T - t) * (sde.N - 1)).long()]
    results = []
    net.eval()
    with torch.no_grad():
        for use_ema in (False, True):
            if use_ema:
                ema.copy_to(net.parameters())
            theirs = runtime.get_score_fn(sde, net, train=False, continuous=continuous)(x, t)
            ours = model_from_checkpoint(ckpt, use_ema=use_ema)(x, sigma)
            results.append((float((ours - theirs).abs().max()), float(theirs.abs().max())))
    line = "  ".join(f"{name} max|diff| {d:.2e} max|score| {m:.3g}"
                     for name, (d, m) in zip(("raw", "EMA"), results))
    print(f"{label:60s} {line}", flush=True)
    return max(d / m for d, m in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ncsn-ref", type=Path, help="a checkout of github.com/ermongroup/ncsn")
    parser.add_argument("--ncsnv2-ref", type=Path,
                        help="a checkout of github.com/ermongroup/ncsnv2")
    parser.add_argument("--score-sde-ref", type=Path,
                        help="a checkout of github.com/yang-song/score_sde_pytorch")
    parser.add_argument("--full", action="store_true", help="also ngf=128 at 32x32")
    parser.add_argument("--langevin", action="store_true", help="also compare sampler chains")
    parser.add_argument("--count", action="store_true",
                        help="NCSN++: parameter counts of score_sde's full configurations")
    args = parser.parse_args()
    if (args.ncsn_ref is None) != (args.ncsnv2_ref is None):
        parser.error("--ncsn-ref and --ncsnv2-ref go together")
    if args.ncsn_ref is None and args.score_sde_ref is None:
        parser.error("give --ncsn-ref and --ncsnv2-ref, or --score-sde-ref, or all three")
    torch.set_num_threads(1)
    worst = 0.0
    if args.ncsn_ref is not None:
        refs = {"ncsn": args.ncsn_ref, "ncsnv2": args.ncsnv2_ref}
        for case in SMALL + (FULL if args.full else []):
            results = compare(*case, refs, langevin=args.langevin)
            worst = max(worst, results[0], *results[2:])
    if args.score_sde_ref is not None:
        score_sde = score_sde_models(args.score_sde_ref)
        for case in NCSNPP_SMALL + (NCSNPP_FULL if args.full else []):
            worst = max(worst, compare_ncsnpp(score_sde, *case))
        runtime = score_sde_runtime(args.score_sde_ref)
        for case in NCSNPP_CHECKPOINTS:
            worst = max(worst, compare_score_sde_checkpoint(score_sde, runtime, *case))
        if args.count:
            count_ncsnpp(score_sde)
    print(f"largest float32 relative difference: {worst:.2e} (bound 1e-5)")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
