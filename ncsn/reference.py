"""The authors' checkpoints as ncsn checkpoints, and back.

Two layouts, both a list that the reference runner ``torch.save``s every ``snapshot_freq``
steps, with the network's state dict under ``torch.nn.DataParallel``'s ``module.`` prefix:

* ``ncsn``: ermongroup/ncsn (Song & Ermon 2019), ``runners/anneal_runner.py``:
  ``[model, optimizer]`` for ``CondRefineNetDilated``. Each conditional instance norm++
  keeps one embedding of 3C values per noise level: gamma, alpha, beta in that order.
* ``ncsnv2``: ermongroup/ncsnv2 (Song & Ermon 2020), ``runners/ncsn_runner.py``:
  ``[model, optimizer, epoch, step]`` and, with ``model.ema``, the EMA shadow last: a dict
  of the parameters under the network's own names (no prefix, no buffers). The network is
  ``NCSNv2``, ``NCSNv2Deeper`` or ``NCSNv2Deepest`` after the dataset (CIFAR-10 and CelebA,
  LSUN, FFHQ), and keeps its sigma table as a buffer.

The run's ``config.yml`` is a ``yaml.dump`` of an ``argparse.Namespace``: it is read with a
safe loader that turns that one tag into a plain mapping. :func:`import_reference` turns the
pair into an ncsn checkpoint (``ncsn.checkpoint``) that ``ncsn-sample`` and ``ncsn-eval``
take; :func:`export_state` is the inverse name mapping, for tests and comparisons.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from torch import Tensor, nn

from ncsn import registry
from ncsn.checkpoint import FORMAT, VERSION, CheckpointError
from ncsn.config import NoiseConfig, OptimConfig, TrainConfig, TrainerConfig
from ncsn.data.images import IMAGE_DATASETS
from ncsn.nets.layers import CondInstanceNorm2dPlus, InstanceNorm2dPlus
from ncsn.nets.ncsn import NCSNConfig
from ncsn.nets.ncsnv2 import NCSNv2Config
from ncsn.objectives import AnnealedDSM
from ncsn.registry import ConfigError
from ncsn.samplers import AnnealedLangevin

LAYOUTS = ("ncsn", "ncsnv2")
PREFIX = "module."                       # torch.nn.DataParallel's

# The reference's names of the encoder stages and RefineBlocks, finest stage first and
# coarsest RefineBlock first, as ncsn's RefineNet orders its ``stages`` and ``refines``.
STAGE_NAMES = {4: ("res1", "res2", "res3", "res4"),
               5: ("res1", "res2", "res3", "res4", "res5"),
               6: ("res1", "res2", "res3", "res31", "res4", "res5")}
REFINE_NAMES = {4: ("refine1", "refine2", "refine3", "refine4"),
                5: ("refine1", "refine2", "refine3", "refine4", "refine5"),
                6: ("refine1", "refine2", "refine31", "refine3", "refine4", "refine5")}

# ncsnv2's runner picks the network by dataset (runners/ncsn_runner.py, get_model).
NCSNV2_DEPTHS = {"CIFAR10": "standard", "CELEBA": "standard", "LSUN": "deeper",
                 "FFHQ": "deepest"}
ACTIVATIONS = {"elu": "elu", "relu": "relu", "swish": "silu"}   # reference -> ncsn
# ncsn's runner samples with 100 steps per level and eps = 2e-5, no denoising step
# (runners/anneal_runner.py, test()); its config files carry no sampling section.
NCSN_SAMPLER = {"step_lr": 2e-5, "n_steps_each": 100, "denoise": False}


class ReferenceFormatError(CheckpointError):
    """A file that is not a reference checkpoint, or weights that its config does not fit.
    The message is one line."""


# ============================================================ config.yml
class _NamespaceLoader(yaml.SafeLoader):
    """yaml's safe loader, plus ``!!python/object:argparse.Namespace`` read as a mapping."""


def _namespace_as_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    return loader.construct_mapping(node, deep=True)


_NamespaceLoader.add_constructor("tag:yaml.org,2002:python/object:argparse.Namespace",
                                 _namespace_as_mapping)


def load_reference_config(path: str | os.PathLike) -> dict:
    """A reference ``config.yml`` (plain, or dumped from an ``argparse.Namespace``) as nested
    dicts. Any other python tag is refused: nothing in the file is executed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        cfg = yaml.load(path.read_text(), Loader=_NamespaceLoader)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"cannot read {path} as a reference config.yml ({reason})") from None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in ("data", "model")):
        raise ConfigError(f"{path} is not a reference config.yml: it needs the sections "
                          f"'data' and 'model' of an ncsn or ncsnv2 config")
    return cfg


# ============================================================ the checkpoint file
def read_foreign_checkpoint(path: Path, what: str):
    """The contents of another code's checkpoint ``path``, read as data
    (``torch.load(weights_only=True)``); a missing file, one torch cannot read that way, or an
    ncsn checkpoint is one line (``what``: "a score_sde checkpoint", for the message)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]   # whole
        raise ReferenceFormatError(f"cannot read {path} with torch.load(weights_only=True): "
                                   f"not {what} ({reason})") from None
    if isinstance(states, dict) and states.get("format") == FORMAT:
        raise ReferenceFormatError(f"{path} is already an ncsn checkpoint; pass it to "
                                   f"ncsn-sample or ncsn-eval as it is")
    return states


def load_reference_checkpoint(path: str | os.PathLike) -> dict:
    """Read a reference checkpoint with ``torch.load(weights_only=True)``.

    Returns ``{"layout": "ncsn" | "ncsnv2", "model": state (prefix removed), "ema": shadow
    or None, "step": int}``; any other content is a :class:`ReferenceFormatError`.
    """
    path = Path(path).expanduser()
    states = read_foreign_checkpoint(path, "a reference checkpoint")
    layout = _layout(states)
    if layout is None:
        raise ReferenceFormatError(
            f"{path} has another layout ({_describe(states)}); expected the list saved by "
            f"ncsn's anneal_runner [model, optimizer] or ncsnv2's ncsn_runner "
            f"[model, optimizer, epoch, step] with the EMA shadow last"
            + ("; for score_sde_pytorch's {optimizer, model, ema, step} add format=score_sde"
               if isinstance(states, dict) and {"model", "ema"} <= set(states) else ""))
    model = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in states[0].items()}
    ema = states[4] if layout == "ncsnv2" and len(states) == 5 else None
    step = states[3] if layout == "ncsnv2" else _step_from_name(path)
    return {"layout": layout, "model": model, "ema": ema, "step": int(step)}


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _layout(states) -> str | None:
    if not isinstance(states, (list, tuple)) or len(states) not in (2, 4, 5):
        return None
    if not (_is_state(states[0]) and isinstance(states[1], dict)):
        return None
    if len(states) == 2:
        return "ncsn"
    if not all(isinstance(s, int) for s in states[2:4]):
        return None
    return "ncsnv2" if len(states) == 4 or _is_state(states[4]) else None


def _describe(states) -> str:
    if isinstance(states, (list, tuple)):
        return f"a {type(states).__name__} of {len(states)}: " + ", ".join(
            type(s).__name__ for s in states[:6])
    if isinstance(states, dict):
        return f"a dict with keys {sorted(map(str, states))[:6]}"
    return f"a {type(states).__name__}"


def _step_from_name(path: Path) -> int:
    match = re.fullmatch(r"checkpoint_(\d+)\.pth", path.name)
    return int(match.group(1)) if match else 0


# ============================================================ names, both ways
def _reference_module(path: str, net: nn.Module) -> str:
    """The reference's name of the module at ``path`` in ncsn's NCSN / NCSNv2 ``net``."""
    parts = path.split(".")[1:]                       # drop "refinenet"
    n = len(net.refinenet.stages)
    if parts[0] in ("begin", "end", "norm"):
        return {"begin": "begin_conv", "end": "end_conv", "norm": "normalizer"}[parts[0]]
    if parts[0] == "stages":                          # stages.s.j.layer
        s, j, layer = int(parts[1]), int(parts[2]), parts[3]
        name = {"norm1": "normalize1", "norm2": "normalize2"}.get(layer, layer)
        if net.refinenet.stages[s][j].pool and layer in ("conv2", "shortcut"):
            name += ".conv"                           # ConvMeanPool: conv, then mean-pool
        return f"{STAGE_NAMES[n][s]}.{j}.{name}"
    refine, part, rest = REFINE_NAMES[n][int(parts[1])], parts[2], parts[3:]
    kind = "norm" if "norms" in rest else "conv"
    if part == "adapt":                               # adapt.i.{norms,convs}.b.s
        return f"{refine}.adapt_convs.{rest[0]}.{int(rest[2]) + 1}_{int(rest[3]) + 1}_{kind}"
    if part == "out":                                 # out.{norms,convs}.b.s
        return f"{refine}.output_convs.{int(rest[1]) + 1}_{int(rest[2]) + 1}_{kind}"
    return f"{refine}.{'msf' if part == 'fuse' else 'crp'}.{rest[0]}.{rest[1]}"


def _units(net: nn.Module):
    """(ncsn name, reference name, module) of every module that holds weights."""
    for path, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, InstanceNorm2dPlus, CondInstanceNorm2dPlus)):
            yield path, _reference_module(path, net), module


def export_state(net: nn.Module) -> dict[str, Tensor]:
    """ncsn's NCSN / NCSNv2 weights under the reference's names (no ``module.`` prefix):
    conditional instance norm++ as one embedding ``[gamma | alpha | beta]`` of ``(L, 3C)``.
    The sigma buffer of NCSNv2's reference network is not included."""
    state = {}
    for path, ref, module in _units(net):
        if isinstance(module, CondInstanceNorm2dPlus):
            state[f"{ref}.embed.weight"] = torch.cat(
                [module.gamma.weight, module.alpha.weight, module.beta.weight], dim=1).detach()
        else:
            state.update({f"{ref}.{k}": v.detach() for k, v in module.named_parameters()})
    return state


def import_state(ref_state: dict[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
    """The reference's parameters (prefix removed, buffers ignored) as a state dict of
    ``net``, checked key by key and shape by shape; a mismatch is a one-line
    :class:`ReferenceFormatError`. Buffers of ``net`` (NCSN's sigma table) are kept."""
    expected = export_state(net)
    params = {k: v for k, v in ref_state.items() if k != "sigmas"}
    _check_keys(params, expected)
    state = dict(net.state_dict())
    for path, ref, module in _units(net):
        if isinstance(module, CondInstanceNorm2dPlus):
            gamma, alpha, beta = params[f"{ref}.embed.weight"].chunk(3, dim=1)
            for name, value in (("gamma", gamma), ("alpha", alpha), ("beta", beta)):
                state[f"{path}.{name}.weight"] = value.clone()
        else:
            for name, _ in module.named_parameters():
                state[f"{path}.{name}"] = params[f"{ref}.{name}"].clone()
    return state


def _check_keys(params: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ReferenceFormatError(
            f"the config does not match the weights: {len(missing)} missing keys "
            f"{missing[:3]}, {len(extra)} unexpected keys {extra[:3]}; pass the config.yml "
            f"of the run that wrote this checkpoint")
    for key, value in expected.items():
        if params[key].shape != value.shape:
            raise ReferenceFormatError(
                f"the config does not match the weights: {key} has shape "
                f"{tuple(params[key].shape)}, the config's network expects {tuple(value.shape)} "
                f"(check model.ngf, model.num_classes, data.channels)")


# ============================================================ the config
def reference_sigmas(model_cfg: dict) -> Tensor:
    """The reference's sigma table: exp(linspace(log sigma_begin, log sigma_end, L)) in
    float64 (numpy), then float32, as both runners compute it. ``(L,)``, largest first."""
    if model_cfg.get("sigma_dist", "geometric") != "geometric":
        raise ConfigError(f"model.sigma_dist={model_cfg['sigma_dist']!r}: ncsn has geometric "
                          f"sigma tables only")
    table = np.exp(np.linspace(np.log(model_cfg["sigma_begin"]), np.log(model_cfg["sigma_end"]),
                               model_cfg["num_classes"]))
    return torch.tensor(table).float()


def _dataset_config(data: dict, layout: str) -> dict:
    """ncsn's dataset config for the reference's ``data`` section."""
    name = data["dataset"]
    fields = {"image_size": data["image_size"], "random_flip": data.get("random_flip", False),
              "logit_transform": data.get("logit_transform", False),
              "rescaled": data.get("rescaled", False),
              "gaussian_dequantization": data.get("gaussian_dequantization", False),
              # ncsn's runner dequantizes every batch, whatever the config says
              "uniform_dequantization": layout == "ncsn" or data.get("uniform_dequantization", False)}
    ours = {"CIFAR10": "cifar10", "MNIST": "mnist", "SVHN": "svhn", "CELEBA": "celeba",
            "LSUN": "lsun", "FFHQ": "image_folder"}.get(name)
    if ours is None:
        raise ConfigError(f"data.dataset={name!r} has no ncsn counterpart; ncsn-import knows "
                          f"CIFAR10, MNIST, SVHN, CELEBA, LSUN and FFHQ")
    if ours == "lsun":
        fields["category"] = data.get("category", "church_outdoor")
    if ours == "image_folder":                      # FFHQ: a folder of images under root
        fields.update(path="ffhq", channels=data["channels"])
    return OmegaConf.to_container(OmegaConf.structured(IMAGE_DATASETS[ours](name=ours, **fields)))


def _model_config(ref: dict, layout: str) -> dict:
    data, model = ref["data"], ref["model"]
    logit, rescaled = data.get("logit_transform", False), data.get("rescaled", False)
    if layout == "ncsn":                            # CondRefineNetDilated ignores `rescaled`
        return OmegaConf.to_container(OmegaConf.structured(
            NCSNConfig(ngf=model["ngf"], activation="elu", rescale_input=not logit)))
    if model.get("normalization", "InstanceNorm++") != "InstanceNorm++" or model.get("spec_norm"):
        raise ConfigError(f"model.normalization={model.get('normalization')!r}, spec_norm="
                          f"{model.get('spec_norm')}: ncsn's NCSNv2 has instance norm++ and no "
                          f"spectral norm")
    activation = ACTIVATIONS.get(str(model.get("nonlinearity", "elu")).lower())
    if activation is None:
        raise ConfigError(f"model.nonlinearity={model['nonlinearity']!r} has no ncsn "
                          f"counterpart; choose one of {sorted(ACTIVATIONS)}")
    if data["dataset"] not in NCSNV2_DEPTHS:
        raise ConfigError(f"data.dataset={data['dataset']!r}: ncsnv2's runner has no network "
                          f"for it; known: {sorted(NCSNV2_DEPTHS)}")
    return OmegaConf.to_container(OmegaConf.structured(NCSNv2Config(
        ngf=model["ngf"], depth=NCSNV2_DEPTHS[data["dataset"]], activation=activation,
        rescale_input=not (logit or rescaled))))


def _sampler_config(ref: dict, layout: str) -> dict:
    """Annealed Langevin with the reference's settings. Both runners start from uniform
    noise on [0, 1] in data space, mapped to model space: [-1, 1] for rescaled data (for
    logit-transformed data ncsn draws uniform [0, 1] in model space instead)."""
    settings = NCSN_SAMPLER if layout == "ncsn" else {
        k: ref["sampling"][k] for k in ("step_lr", "n_steps_each", "denoise")}
    low = -1.0 if ref["data"].get("rescaled", False) else 0.0
    return OmegaConf.to_container(OmegaConf.structured(AnnealedLangevin.Config(
        init="uniform", init_low=low, init_high=1.0, **settings)))


def translate_config(ref: dict, layout: str) -> dict:
    """A reference config (nested dicts) in ncsn's schema (``ncsn.config.TrainConfig``), as
    the plain dict an ncsn checkpoint keeps."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "ncsnv2" and not isinstance(ref.get("sampling"), dict):
        raise ConfigError("an ncsnv2 config.yml has a 'sampling' section; this one has none "
                          "(is it ncsn's config?)")
    try:
        return _translate(ref, layout)
    except KeyError as err:
        raise ConfigError(f"the reference config lacks the key {err.args[0]!r}") from None


def _translate(ref: dict, layout: str) -> dict:
    data, model, training = ref["data"], ref["model"], ref.get("training", {})
    optim = ref.get("optim", {})
    cfg = OmegaConf.structured(TrainConfig(
        noise=NoiseConfig(sigma_begin=float(model["sigma_begin"]),
                          sigma_end=float(model["sigma_end"]),
                          num_scales=int(model["num_classes"])),
        optim=OptimConfig(lr=optim.get("lr", 1e-3), betas=[optim.get("beta1", 0.9), 0.999],
                          eps=optim.get("eps", 1e-8), weight_decay=optim.get("weight_decay", 0.0),
                          amsgrad=optim.get("amsgrad", False)),
        # The runners stop after step n_iters = N + 1 without saving it; their last
        # checkpoint, and ncsn's experiment files, end at N.
        trainer=TrainerConfig(n_steps=training.get("n_iters", 200001) - 1,
                              batch_size=training.get("batch_size", 128),
                              ema=bool(model.get("ema", False)),
                              ema_rate=model.get("ema_rate", 0.999),
                              ckpt_every=training.get("snapshot_freq", 5000))))
    cfg.dataset = _dataset_config(data, layout)
    cfg.model = _model_config(ref, layout)
    cfg.loss = OmegaConf.structured(AnnealedDSM.Config(anneal_power=training.get("anneal_power", 2.0)))
    cfg.sampler = _sampler_config(ref, layout)
    return OmegaConf.to_container(cfg, resolve=True)


# ============================================================ the whole import
def import_reference(src: str | os.PathLike, config: str | os.PathLike) -> dict:
    """The reference checkpoint ``src`` with its run's ``config`` as an ncsn checkpoint dict
    (save it with ``torch.save`` or :func:`ncsn.checkpoint.atomic_save`)."""
    loaded = load_reference_checkpoint(src)
    ref_cfg = load_reference_config(config)
    cfg = translate_config(ref_cfg, loaded["layout"])
    sigmas = _sigma_table(loaded["model"], ref_cfg["model"])
    shape = _data_shape(ref_cfg["data"])
    net = registry.build_model(OmegaConf.create(cfg["model"]), shape, sigmas)
    ema = loaded["ema"]
    return {"format": FORMAT, "version": VERSION, "step": loaded["step"], "config": cfg,
            "sigmas": sigmas, "data_shape": list(shape),
            "model": import_state(loaded["model"], net),
            "ema": import_state(ema, net) if ema is not None else None,
            "source": {"layout": loaded["layout"], "checkpoint": str(src), "config": str(config)}}


def _data_shape(data: dict) -> tuple[int, int, int]:
    if "channels" not in data:
        raise ConfigError("the reference config lacks the key 'channels' (data section)")
    return (int(data["channels"]), int(data["image_size"]), int(data["image_size"]))


def _sigma_table(state: dict[str, Tensor], model_cfg: dict) -> Tensor:
    """NCSNv2's buffer when the file has it (checked against the config), else the config's."""
    table = reference_sigmas(model_cfg)
    saved = state.get("sigmas")
    if saved is None:
        return table
    if saved.shape != table.shape or not torch.allclose(saved.float(), table, rtol=1e-5):
        raise ReferenceFormatError(
            f"the config does not match the weights: the checkpoint's sigma table "
            f"({len(saved)} levels, {float(saved[0]):.4g} -> {float(saved[-1]):.4g}) is not the "
            f"config's ({len(table)} levels, {float(table[0]):.4g} -> {float(table[-1]):.4g})")
    return saved.float().clone()
