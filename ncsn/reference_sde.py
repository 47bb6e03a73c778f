"""score_sde_pytorch's NCSN++ checkpoints (Song et al. 2021) as ncsn checkpoints.

yang-song/score_sde_pytorch's ``run_lib.py`` saves, every ``training.snapshot_freq`` steps,
``checkpoints/checkpoint_<n>.pth`` with ``utils.save_checkpoint``:
``torch.save({'optimizer': Adam's state dict, 'model': the DataParallel network's state dict
(keys 'module.all_modules.<i>...', and 'module.sigmas'), 'ema': models/ema.py's
ExponentialMovingAverage.state_dict() = {'decay', 'num_updates', 'shadow_params'},
'step': int})``. The shadow list holds one tensor per parameter that requires a gradient,
in the network's parameter order: the fixed Fourier frequencies (``all_modules.0.W``) are
not in it, and come from ``'model'``.

Its configuration is a Python file (``configs/ve/<name>.py``) that is not read here: a
released VE configuration is named (``config=ve/cifar10_ncsnpp_continuous``) and its fields
come from :data:`SCORE_SDE_CONFIGS`, transcribed from those files; any other is a YAML or
JSON file holding the same fields as nested mappings, read as data.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from ncsn import registry
from ncsn.checkpoint import FORMAT, VERSION
from ncsn.config import NoiseConfig, OptimConfig, TrainConfig, TrainerConfig
from ncsn.data.images import IMAGE_DATASETS
from ncsn.nets.ncsnpp import NCSNppConfig, from_score_sde, score_sde_keys
from ncsn.noise import geometric_sigmas
from ncsn.objectives import AnnealedDSM
from ncsn.reference import ReferenceFormatError, _describe, _is_state, read_foreign_checkpoint
from ncsn.registry import ConfigError
from ncsn.samplers import PredictorCorrector


def _merged(*trees: dict) -> dict:
    """Nested dicts merged left to right (later values win), as score_sde's config files
    start from ``get_default_configs()`` and set some fields."""
    out: dict = {}
    for tree in trees:
        for section, fields in tree.items():
            out.setdefault(section, {}).update(copy.deepcopy(fields))
    return out


# ============================================================ the released VE configurations
# configs/default_cifar10_configs.py (the fields the import reads)
_CIFAR10 = {
    "training": {"batch_size": 128, "n_iters": 1300001, "snapshot_freq": 50000,
                 "snapshot_sampling": True, "likelihood_weighting": False, "continuous": True,
                 "reduce_mean": False},
    "sampling": {"n_steps_each": 1, "noise_removal": True, "probability_flow": False,
                 "snr": 0.16},
    "data": {"dataset": "CIFAR10", "image_size": 32, "random_flip": True, "centered": False,
             "uniform_dequantization": False, "num_channels": 3},
    "model": {"sigma_min": 0.01, "sigma_max": 50, "num_scales": 1000, "dropout": 0.1,
              "embedding_type": "fourier"},
    "optim": {"weight_decay": 0, "optimizer": "Adam", "lr": 2e-4, "beta1": 0.9, "eps": 1e-8,
              "warmup": 5000, "grad_clip": 1.0},
}
# configs/default_lsun_configs.py (LSUN, and CelebA-HQ and FFHQ at 256 px)
_LSUN = {
    "training": {"batch_size": 64, "n_iters": 2400001, "snapshot_freq": 50000,
                 "snapshot_sampling": True, "likelihood_weighting": False, "continuous": True,
                 "reduce_mean": False},
    "sampling": {"n_steps_each": 1, "noise_removal": True, "probability_flow": False,
                 "snr": 0.075},
    "data": {"dataset": "LSUN", "image_size": 256, "random_flip": True,
             "uniform_dequantization": False, "centered": False, "num_channels": 3},
    "model": {"sigma_max": 378, "sigma_min": 0.01, "num_scales": 2000, "dropout": 0.0,
              "embedding_type": "fourier"},
    "optim": {"weight_decay": 0, "optimizer": "Adam", "lr": 2e-4, "beta1": 0.9, "eps": 1e-8,
              "warmup": 5000, "grad_clip": 1.0},
}
# what every configs/ve/*_ncsnpp*.py sets: the VE SDE, PC sampling, the CIFAR-10 NCSN++
_VE_NCSNPP = {
    "training": {"sde": "vesde", "continuous": True},
    "sampling": {"method": "pc", "predictor": "reverse_diffusion", "corrector": "langevin"},
    "model": {"name": "ncsnpp", "scale_by_sigma": True, "ema_rate": 0.999,
              "normalization": "GroupNorm", "nonlinearity": "swish", "nf": 128,
              "ch_mult": [1, 2, 2, 2], "num_res_blocks": 4, "attn_resolutions": [16],
              "resamp_with_conv": True, "conditional": True, "fir": True,
              "fir_kernel": [1, 3, 3, 1], "skip_rescale": True, "resblock_type": "biggan",
              "progressive": "none", "progressive_input": "residual",
              "progressive_combine": "sum", "attention_type": "ddpm", "init_scale": 0.0,
              "fourier_scale": 16, "conv_size": 3},
}
# the 256 px network of configs/ve/{celebahq_256,church,bedroom,ffhq_256}_ncsnpp_continuous.py
_NET_256 = {"model": {"ch_mult": [1, 1, 2, 2, 2, 2, 2], "num_res_blocks": 2,
                      "progressive": "output_skip", "progressive_input": "input_skip"}}


def _config_1024(dataset: str, reduce_mean: bool) -> dict:
    """configs/ve/ffhq_ncsnpp_continuous.py and celebahq_ncsnpp_continuous.py: 1024 px, set
    in full (no default file); the two differ in the dataset and ``reduce_mean``."""
    return _merged(_VE_NCSNPP, {
        "training": {"batch_size": 8, "n_iters": 2400001, "snapshot_freq": 50000,
                     "snapshot_sampling": True, "likelihood_weighting": False,
                     "reduce_mean": reduce_mean},
        "sampling": {"probability_flow": False, "snr": 0.15, "n_steps_each": 1,
                     "noise_removal": True},
        "data": {"dataset": dataset, "image_size": 1024, "centered": False, "random_flip": True,
                 "uniform_dequantization": False, "num_channels": 3},
        "model": {"sigma_max": 1348, "num_scales": 2000, "ema_rate": 0.9999, "sigma_min": 0.01,
                  "nf": 16, "ch_mult": [1, 2, 4, 8, 16, 32, 32, 32], "num_res_blocks": 1,
                  "dropout": 0.0, "progressive": "output_skip",
                  "progressive_input": "input_skip", "embedding_type": "fourier"},
        "optim": {"weight_decay": 0, "optimizer": "Adam", "lr": 2e-4, "beta1": 0.9,
                  "amsgrad": False, "eps": 1e-8, "warmup": 5000, "grad_clip": 1.0}})


SCORE_SDE_CONFIGS = {
    # configs/ve/cifar10_ncsnpp_continuous.py
    "ve/cifar10_ncsnpp_continuous": _merged(_CIFAR10, _VE_NCSNPP),
    # configs/ve/cifar10_ncsnpp_deep_continuous.py
    "ve/cifar10_ncsnpp_deep_continuous": _merged(
        _CIFAR10, _VE_NCSNPP, {"training": {"n_iters": 950001}, "model": {"num_res_blocks": 8}}),
    # configs/ve/cifar10_ncsnpp.py: discrete SMLD training, the table index embedded
    "ve/cifar10_ncsnpp": _merged(
        _CIFAR10, _VE_NCSNPP, {"training": {"continuous": False},
                               "model": {"embedding_type": "positional"}}),
    # configs/ve/celebahq_256_ncsnpp_continuous.py
    "ve/celebahq_256_ncsnpp_continuous": _merged(
        _LSUN, _VE_NCSNPP, _NET_256, {"data": {"dataset": "CelebAHQ", "image_size": 256},
                                      "model": {"sigma_max": 348}}),
    # configs/ve/ffhq_256_ncsnpp_continuous.py
    "ve/ffhq_256_ncsnpp_continuous": _merged(
        _LSUN, _VE_NCSNPP, _NET_256, {"data": {"dataset": "FFHQ", "image_size": 256},
                                      "model": {"sigma_max": 348}}),
    # configs/ve/church_ncsnpp_continuous.py
    "ve/church_ncsnpp_continuous": _merged(
        _LSUN, _VE_NCSNPP, _NET_256, {"data": {"category": "church_outdoor"},
                                      "model": {"sigma_max": 380}}),
    # configs/ve/bedroom_ncsnpp_continuous.py (default_lsun_configs' sigma_max 378)
    "ve/bedroom_ncsnpp_continuous": _merged(
        _LSUN, _VE_NCSNPP, _NET_256, {"data": {"category": "bedroom"}}),
    # configs/ve/ffhq_ncsnpp_continuous.py (its checkpoint folder: ve/ffhq_1024_ncsnpp_continuous)
    "ve/ffhq_ncsnpp_continuous": _config_1024("FFHQ", reduce_mean=True),
    # configs/ve/celebahq_ncsnpp_continuous.py (1024 px)
    "ve/celebahq_ncsnpp_continuous": _config_1024("CelebAHQ", reduce_mean=False),
}
# the README's name of the released FFHQ 1024 checkpoint's folder
SCORE_SDE_CONFIGS["ve/ffhq_1024_ncsnpp_continuous"] = SCORE_SDE_CONFIGS["ve/ffhq_ncsnpp_continuous"]

# The fields the import reads (a config file must have them), and those it knows and leaves
# aside (score_sde's training, evaluation and bookkeeping settings).
REQUIRED = {
    "training": ("sde", "continuous", "batch_size", "n_iters", "snapshot_freq"),
    "data": ("dataset", "image_size", "num_channels", "centered", "random_flip"),
    "model": ("name", "sigma_min", "sigma_max", "num_scales", "scale_by_sigma", "ema_rate",
              "normalization", "nonlinearity", "nf", "ch_mult", "num_res_blocks",
              "attn_resolutions", "dropout", "resamp_with_conv", "conditional", "fir",
              "fir_kernel", "skip_rescale", "resblock_type", "progressive", "progressive_input",
              "progressive_combine", "init_scale", "embedding_type"),
    "sampling": ("method", "predictor", "corrector", "snr", "n_steps_each", "noise_removal",
                 "probability_flow"),
}
OPTIONAL = {
    "training": ("snapshot_sampling", "likelihood_weighting", "reduce_mean", "log_freq",
                 "eval_freq", "snapshot_freq_for_preemption", "n_jitted_steps"),
    "data": ("uniform_dequantization", "category", "tfrecords_path"),
    "model": ("fourier_scale", "attention_type", "conv_size", "beta_min", "beta_max"),
    "sampling": (),
    "optim": ("weight_decay", "optimizer", "lr", "beta1", "eps", "warmup", "grad_clip",
              "amsgrad"),
}
OTHER_SECTIONS = ("eval", "seed", "device")        # read by score_sde's evaluation or runner

# score_sde's datasets.py names -> ncsn's dataset configs
DATASETS = {"CIFAR10": "cifar10", "SVHN": "svhn", "CELEBA": "celeba", "LSUN": "lsun",
            "CelebAHQ": "image_folder", "FFHQ": "image_folder"}


# ============================================================ reading the config
def score_sde_config(config: str | os.PathLike) -> dict:
    """A score_sde configuration as nested dicts: a name of :data:`SCORE_SDE_CONFIGS`, or a
    YAML or JSON file of the same sections, read with safe loaders and checked field by
    field (:func:`check_config`)."""
    text = str(config)
    path = Path(text).expanduser()
    if not (path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file()):
        return copy.deepcopy(_named_config(text))
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        tree = (json.loads(path.read_text()) if path.suffix.lower() == ".json"
                else yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"cannot read {path} as a YAML or JSON score_sde config "
                          f"({reason})") from None
    check_config(tree, str(path))
    return tree


def _named_config(name: str) -> dict:
    if name in SCORE_SDE_CONFIGS:
        return SCORE_SDE_CONFIGS[name]
    known = ", ".join(n for n in SCORE_SDE_CONFIGS if n != "ve/ffhq_1024_ncsnpp_continuous")
    if name.split("/")[0] in ("vp", "subvp"):
        raise ConfigError(f"config={name} is a VP-SDE configuration; ncsn-import reads score_"
                          f"sde's VE NCSN++ checkpoints only: {known}")
    raise ConfigError(f"config={name}: no such score_sde VE configuration and no such file; "
                      f"give one of {known}, or a YAML or JSON file of its fields")


def check_config(tree, where: str) -> None:
    """Every section and field of :data:`REQUIRED` there, nothing that score_sde's configs
    do not have; a problem is a one-line :class:`ConfigError` naming the fields."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} is not a score_sde config: it needs the mappings "
                          f"{', '.join(REQUIRED)}")
    unknown = [s for s in tree if s not in REQUIRED and s not in OPTIONAL
               and s not in OTHER_SECTIONS]
    missing = [s for s in REQUIRED if not isinstance(tree.get(s), dict)]
    if unknown or missing:
        raise ConfigError(f"{where}: " + "; ".join(
            ([f"missing sections (mappings) {', '.join(missing)}"] if missing else []) +
            ([f"unknown sections {', '.join(map(str, unknown))}"] if unknown else [])))
    if "optim" in tree and not isinstance(tree["optim"], dict):
        raise ConfigError(f"{where}: optim is not a mapping")
    missing, unknown = [], []
    for section, required in REQUIRED.items():
        fields = tree[section]
        missing += [f"{section}.{f}" for f in required if f not in fields]
        unknown += [f"{section}.{f}" for f in fields
                    if f not in required and f not in OPTIONAL[section]]
    unknown += [f"optim.{f}" for f in tree.get("optim", {}) if f not in OPTIONAL["optim"]]
    if tree["model"].get("embedding_type") == "fourier" and "fourier_scale" not in tree["model"]:
        missing.append("model.fourier_scale")
    if missing or unknown:
        raise ConfigError(f"{where}: " + "; ".join(
            ([f"missing fields {', '.join(missing)}"] if missing else []) +
            ([f"unknown fields {', '.join(unknown)}"] if unknown else [])))


# ============================================================ the config in ncsn's schema
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_supported(ref: dict) -> None:
    training, model, sampling = ref["training"], ref["model"], ref["sampling"]
    _require(training["sde"] == "vesde", f"training.sde={training['sde']!r}: ncsn-import "
             f"reads score_sde's VE-SDE checkpoints (sde='vesde') only")
    _require(model["name"] == "ncsnpp", f"model.name={model['name']!r}: ncsn has score_sde's "
             f"NCSN++ (model.name='ncsnpp') only")
    for key, value in (("normalization", "GroupNorm"), ("nonlinearity", "swish"),
                       ("conditional", True)):
        _require(model[key] == value, f"model.{key}={model[key]!r}: ncsn's NCSN++ has "
                 f"{key} {value!r} only")
    _require(ref["data"]["dataset"] in DATASETS, f"data.dataset={ref['data']['dataset']!r} "
             f"has no ncsn counterpart; known: {', '.join(DATASETS)}")
    _require(sampling["method"] == "pc", f"sampling.method={sampling['method']!r}: ncsn-import "
             f"translates the predictor-corrector sampler ('pc'); import with 'pc' and sample "
             f"with sampler=ode for the probability-flow ODE")
    _require(sampling["predictor"] in ("reverse_diffusion", "euler_maruyama"),
             f"sampling.predictor={sampling['predictor']!r}: ncsn's pc sampler has "
             f"reverse_diffusion and euler_maruyama")
    _require(sampling["corrector"] in ("langevin", "none"), f"sampling.corrector="
             f"{sampling['corrector']!r}: ncsn's pc sampler has the langevin corrector (or none)")
    _require(not sampling["probability_flow"], "sampling.probability_flow=true: ncsn's pc "
             "sampler has no probability-flow predictor; import with false and sample with "
             "sampler=ode")


def _dataset_config(data: dict) -> dict:
    """ncsn's dataset for score_sde's ``data``: images in [0, 1] unless ``centered`` (then
    [-1, 1], ``rescaled``), as score_sde's ``get_data_scaler``."""
    name = DATASETS[data["dataset"]]
    fields = {"image_size": data["image_size"], "random_flip": data["random_flip"],
              "rescaled": bool(data["centered"]),
              "uniform_dequantization": data.get("uniform_dequantization", False)}
    if name == "lsun":
        fields["category"] = data.get("category", "church_outdoor")
    if name == "image_folder":         # score_sde reads TFRecords of them; ncsn a folder
        fields.update(path=data["dataset"].lower(), channels=data["num_channels"])
    return OmegaConf.to_container(OmegaConf.structured(IMAGE_DATASETS[name](name=name, **fields)))


def _model_config(ref: dict) -> dict:
    model = ref["model"]
    names = [f for f in NCSNppConfig.__dataclass_fields__
             if f not in ("name", "centered", "precond", "sigma_data")]
    fields = {f: model[f] for f in names if f in model}   # fourier_scale: fourier only
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return OmegaConf.to_container(OmegaConf.structured(
        NCSNppConfig(**fields, centered=bool(ref["data"]["centered"]))))


def translate_score_sde(ref: dict) -> dict:
    """A score_sde configuration (nested dicts, checked) in ncsn's schema
    (``ncsn.config.TrainConfig``), as the plain dict an ncsn checkpoint keeps: what
    ``experiment=ncsnpp_cifar10`` and its siblings compose to for their setups."""
    _check_supported(ref)
    training, model, sampling = ref["training"], ref["model"], ref["sampling"]
    optim = _merged(_CIFAR10, {"optim": ref.get("optim", {})})["optim"]
    n_steps = int(training["n_iters"]) - 1     # run_lib's last checkpoint is at n_iters - 1
    every = int(training["snapshot_freq"])
    try:
        cfg = OmegaConf.structured(TrainConfig(
            noise=NoiseConfig(sigma_begin=float(model["sigma_max"]),
                              sigma_end=float(model["sigma_min"]),
                              num_scales=int(model["num_scales"]),
                              continuous=bool(training["continuous"]),
                              distribution="log_uniform"),
            optim=OptimConfig(lr=optim["lr"], betas=[optim["beta1"], 0.999], eps=optim["eps"],
                              weight_decay=optim["weight_decay"],
                              amsgrad=optim.get("amsgrad", False),
                              grad_clip=optim["grad_clip"], warmup=optim["warmup"]),
            trainer=TrainerConfig(n_steps=n_steps, batch_size=training["batch_size"], ema=True,
                                  ema_rate=model["ema_rate"], ckpt_every=every,
                                  keep_last=max(1, n_steps // every),
                                  sample_every=every if training.get("snapshot_sampling", True)
                                  else 0,
                                  n_plot_samples=training["batch_size"])))
        cfg.dataset = _dataset_config(ref["data"])
        cfg.model = _model_config(ref)
        cfg.loss = OmegaConf.structured(AnnealedDSM.Config(anneal_power=2.0))
        cfg.sampler = OmegaConf.structured(PredictorCorrector.Config(
            num_steps=None, predictor=sampling["predictor"], snr=sampling["snr"],
            n_corrector_steps=sampling["n_steps_each"] if sampling["corrector"] != "none" else 0,
            denoise=sampling["noise_removal"], init="gaussian", init_std=None))
        return OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"the score_sde config has a value of the wrong type ({reason})") from None


# ============================================================ the checkpoint
def load_score_sde_checkpoint(path: str | os.PathLike) -> dict:
    """run_lib.py's checkpoint, read with ``torch.load(weights_only=True)``:
    ``{"model": state dict, "shadow": list of tensors, "step": int}``; anything else is a
    one-line :class:`ReferenceFormatError`."""
    states = read_foreign_checkpoint(Path(path).expanduser(), "a score_sde checkpoint")
    expected = ("expected run_lib.py's {'optimizer', 'model', 'ema', 'step'} with the network's "
                "state dict under 'model' and the EMA's state dict under 'ema'")
    if not (isinstance(states, dict) and _is_state(states.get("model"))
            and isinstance(states.get("ema"), dict)):
        raise ReferenceFormatError(f"{path} is not a score_sde checkpoint ({_describe(states)}); "
                                   f"{expected}")
    shadow = states["ema"].get("shadow_params")
    if not (isinstance(shadow, (list, tuple)) and all(isinstance(t, Tensor) for t in shadow)):
        raise ReferenceFormatError(f"{path}: 'ema' has no list 'shadow_params' of tensors "
                                   f"(models/ema.py's state dict); {expected}")
    step = states.get("step", 0)
    return {"model": states["model"], "shadow": list(shadow),
            "step": int(step.item() if isinstance(step, Tensor) else step)}


def shadow_state(model: dict[str, Tensor], shadow: list[Tensor], net) -> dict[str, Tensor]:
    """score_sde's state dict of the EMA weights: the shadow tensors under the keys of the
    parameters that require a gradient, in score_sde's order (:func:`score_sde_keys`), the
    rest (the Fourier frequencies W, the sigma table) from ``model``."""
    theirs = {k.removeprefix("module."): v for k, v in model.items()}
    buffers = {name for name, _ in net.named_buffers()}
    trainable = [k for k, ours in score_sde_keys(net).items() if ours not in buffers]
    if len(shadow) != len(trainable):
        raise ReferenceFormatError(
            f"the config does not match the EMA: 'ema' holds {len(shadow)} shadow tensors, the "
            f"config's network has {len(trainable)} trainable parameters")
    return {**theirs, **dict(zip(trainable, shadow))}


def _converted(state: dict[str, Tensor], net, sigmas: Tensor, what: str) -> dict[str, Tensor]:
    try:
        out = from_score_sde(state, net)
    except ValueError as err:
        raise ReferenceFormatError(f"the config does not match the {what}: {err}; pass the "
                                   f"config of the run that wrote this checkpoint") from None
    if "sigmas" in out:                        # the positional embedding's table
        saved = out["sigmas"].double()
        if saved.shape != sigmas.shape or not torch.allclose(saved, sigmas.double(), rtol=1e-5):
            raise ReferenceFormatError(
                f"the config does not match the {what}: the checkpoint's sigma table "
                f"({len(saved)} levels) is not the config's ({len(sigmas)} levels, "
                f"{float(sigmas[0]):.4g} -> {float(sigmas[-1]):.4g})")
        out["sigmas"] = sigmas.clone()
    return {k: v.float().clone() for k, v in out.items()}


def import_score_sde(src: str | os.PathLike, config: str | os.PathLike) -> dict:
    """score_sde's checkpoint ``src`` with its configuration ``config`` (a released VE name
    or a YAML/JSON file) as an ncsn checkpoint dict: ``model`` the network's weights,
    ``ema`` the EMA's shadow weights (sampling's default)."""
    ref = score_sde_config(config)
    cfg = translate_score_sde(ref)
    loaded = load_score_sde_checkpoint(src)
    data, model = ref["data"], ref["model"]
    shape = (int(data["num_channels"]), int(data["image_size"]), int(data["image_size"]))
    sigmas = geometric_sigmas(float(model["sigma_max"]), float(model["sigma_min"]),
                              int(model["num_scales"]))
    try:
        net = registry.build_model(OmegaConf.create(cfg["model"]), shape, sigmas)
    except ValueError as err:
        raise ConfigError(f"the score_sde config's network cannot be built: {err}") from None
    return {"format": FORMAT, "version": VERSION, "step": loaded["step"], "config": cfg,
            "sigmas": sigmas, "data_shape": list(shape),
            "model": _converted(loaded["model"], net, sigmas, "weights"),
            "ema": _converted(shadow_state(loaded["model"], loaded["shadow"], net), net,
                              sigmas, "EMA"),
            "source": {"layout": "score_sde", "checkpoint": str(src), "config": str(config)}}
