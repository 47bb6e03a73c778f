"""Check ncsn's EDM preconditioning and losses against NVlabs/edm's code: EDM's EDMPrecond and
VEPrecond (training/networks.py) and ncsn's (``model.precond=edm|ve``) around the same inner
function, and EDM's EDMLoss and VELoss (training/loss.py) and ncsn's (``loss=edm|ve_edm``)
from the same seed, so with the same sigma and noise; EDM's AugmentPipe (training/augment.py,
with train.py's --augment options) and ncsn's (``ncsn/augment.py``) from the same seed on the
same images, SongUNet and NCSN++ given the same augmentation labels (``augment_dim=9``), and
the augmented loss through both. Prints the largest differences as a Markdown table
(docs/REPRODUCING.md keeps one).

EDM's code is read at run time from a checkout given on the command line (export the public
repository, e.g. ``git archive``); nothing of it is kept here. Its ``torch_utils.persistence``
decorator (pickling support, which needs dnnlib and requests) is replaced by a stub that
returns the class unchanged, and its ``torch_utils.misc``, of which augment.py uses only
``constant`` (a cached tensor of a constant; misc itself imports dnnlib), by a stub whose
``constant`` builds the same tensor without the cache; nothing else of EDM's is altered.

    python scripts/check_edm.py --edm /tmp/edm
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from ncsn import losses, registry
from ncsn.augment import AUGMENT_DIM, AugmentPipe
from ncsn.config import config_dir
from ncsn.nets.ncsnpp import NCSNpp
from ncsn.nets.precond import EDMPrecond, VEPrecond
from ncsn.nets.unet import UNet
from ncsn.noise import geometric_sigmas

SHAPE = (3, 8, 8)
BATCH = 64
# sigma over EDM's sampling range (0.002 .. 80) and past both of its training ranges.
SIGMAS = torch.logspace(math.log10(1e-3), math.log10(200.0), 41)


def constant(value, shape=None, dtype=None, device=None, memory_format=None) -> torch.Tensor:
    """EDM's ``torch_utils.misc.constant`` without its cache: ``value`` as a tensor of
    ``dtype`` (default: torch's default dtype) on ``device`` (default: the CPU), broadcast to
    ``shape``."""
    tensor = torch.as_tensor(np.asarray(value).copy(), dtype=dtype or torch.get_default_dtype(),
                             device=device or torch.device("cpu"))
    if shape is not None:
        tensor, _ = torch.broadcast_tensors(tensor, torch.empty(tuple(shape)))
    return tensor.contiguous(memory_format=memory_format or torch.contiguous_format)


def load_edm(root: Path) -> tuple[types.ModuleType, ...]:
    """EDM's training/networks.py, training/loss.py and training/augment.py as modules, with
    a stub ``torch_utils.persistence`` whose ``persistent_class`` returns the class as it is,
    and a stub ``torch_utils.misc`` holding :func:`constant` only."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls
    misc = types.ModuleType("torch_utils.misc")
    misc.constant = constant
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence, torch_utils.misc = persistence, misc
    sys.modules.update({"torch_utils": torch_utils, "torch_utils.persistence": persistence,
                        "torch_utils.misc": misc})
    modules = []
    for name in ("networks", "loss", "augment"):
        path = root / "training" / f"{name}.py"
        if not path.is_file():
            sys.exit(f"check_edm: {path} not found; --edm takes a checkout of NVlabs/edm")
        spec = importlib.util.spec_from_file_location(f"edm_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return tuple(modules)


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


# ------------------------------------------------------------ NCSN++ as EDM's SongUNet
# train.py --arch=ncsnpp: SongUNet's keyword arguments besides the sizes.
SONG_UNET_NCSNPP = dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                        decoder_type="standard", resample_filter=[1, 3, 3, 1])
# experiment=edm_cifar10_ve at a small size: 16 px, width 16, 2 blocks, attention at 8 px.
SMALL = {"image_size": 16, "nf": 16, "num_res_blocks": 2, "attn_resolutions": [8]}


def experiment_network(small: bool = True) -> tuple[NCSNpp, dict]:
    """ncsn's network of ``experiment=edm_cifar10_ve`` (registry-built, at SMALL sizes
    unless ``small`` is false, no dropout), and the SongUNet keyword arguments of the same
    sizes."""
    from hydra import compose, initialize_config_dir

    from ncsn.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        sizes = [f"dataset.image_size={SMALL['image_size']}", f"model.nf={SMALL['nf']}",
                 f"model.num_res_blocks={SMALL['num_res_blocks']}",
                 f"model.attn_resolutions={SMALL['attn_resolutions']}"] if small else []
        cfg = compose("train", overrides=["experiment=edm_cifar10_ve", *sizes,
                                          "model.dropout=0.0", "model.precond=none"])
    shape = (3, cfg.dataset.image_size, cfg.dataset.image_size)
    net = registry.build_model(cfg.model, shape, geometric_sigmas(80.0, 0.002, 18))
    song = dict(img_resolution=shape[1], in_channels=3, out_channels=3,
                model_channels=cfg.model.nf, channel_mult=list(cfg.model.ch_mult),
                num_blocks=cfg.model.num_res_blocks,
                attn_resolutions=list(cfg.model.attn_resolutions), dropout=0.0,
                augment_dim=cfg.model.augment_dim, **SONG_UNET_NCSNPP)
    return net, song


# Our BigGAN block's layers -> SongUNet UNetBlock's; our attention's -> the same block's.
_BLOCK_LAYERS = {"norm1": "norm0", "conv1": "conv0", "emb_proj": "affine", "norm2": "norm1",
                 "conv2": "conv1", "skip": "skip"}
_ATTENTION_LAYERS = {"norm": "norm2", "proj": "proj", "qkv": "qkv"}    # qkv: split on loading


def _block_tensors(ours_block, attn, theirs: str) -> dict[str, tuple]:
    """SongUNet UNetBlock ``theirs`` -> our BigGAN residual block (+ attention) keys."""
    keys = {}
    for name in ours_block.state_dict():
        layer, _, kind = name.partition(".")
        keys[f"{theirs}.{_BLOCK_LAYERS[layer]}.{kind}"] = (ours_block, name)
    if attn is not None:
        for layer, their_layer in _ATTENTION_LAYERS.items():
            for kind in ("weight", "bias"):
                keys[f"{theirs}.{their_layer}.{kind}"] = (attn, f"{layer}.{kind}")
    return keys


def song_unet_keys(net: NCSNpp, song) -> dict[str, tuple]:
    """SongUNet's state-dict key -> (our module, its key), walking both in forward order."""
    res = lambda level: f"{song['img_resolution'] >> level}x{song['img_resolution'] >> level}"
    keys = {"map_noise.freqs": (net.fourier, "W"),
            **({"map_augment.weight": (net.map_augment, "weight")} if net.map_augment else {}),
            "map_layer0.weight": (net.embed[0], "weight"), "map_layer0.bias": (net.embed[0], "bias"),
            "map_layer1.weight": (net.embed[2], "weight"), "map_layer1.bias": (net.embed[2], "bias"),
            f"enc.{res(0)}_conv.weight": (net.conv_in, "weight"),
            f"enc.{res(0)}_conv.bias": (net.conv_in, "bias")}
    for i, level in enumerate(net.down):
        if i > 0:                                  # the previous level's way down
            before = net.down[i - 1]
            keys.update(_block_tensors(before.down, None, f"enc.{res(i)}_down"))
            for kind in ("weight", "bias"):
                keys[f"enc.{res(i)}_aux_residual.{kind}"] = (before.pyramid.conv, kind)
        for j, (block, attn) in enumerate(zip(level.blocks, level.attns)):
            attn = None if isinstance(attn, nn.Identity) else attn
            keys.update(_block_tensors(block, attn, f"enc.{res(i)}_block{j}"))
    last = len(net.down) - 1
    keys.update(_block_tensors(net.mid_block1, net.mid_attn, f"dec.{res(last)}_in0"))
    keys.update(_block_tensors(net.mid_block2, None, f"dec.{res(last)}_in1"))
    for k, level in enumerate(net.up):
        i = last - k
        if i < last:
            keys.update(_block_tensors(net.up[k - 1].up, None, f"dec.{res(i)}_up"))
        for j, block in enumerate(level.blocks):
            attn = level.attn if j == len(level.blocks) - 1 else None
            keys.update(_block_tensors(block, attn, f"dec.{res(i)}_block{j}"))
    for kind in ("weight", "bias"):
        keys[f"dec.{res(0)}_aux_norm.{kind}"] = (net.norm_out, kind)
        keys[f"dec.{res(0)}_aux_conv.{kind}"] = (net.conv_out, kind)
    return keys


def load_song_unet_weights(net: NCSNpp, song_net: nn.Module, song) -> int:
    """Copy SongUNet's weights into ``net``; returns how many tensors were copied. Every
    SongUNet parameter must find a place (its FIR filter buffers are fixed, not weights)."""
    keys, theirs = song_unet_keys(net, song), song_net.state_dict()
    left = [k for k in theirs if k not in keys and not k.endswith("resample_filter")]
    if left:
        raise SystemExit(f"check_edm: SongUNet keys with no place here: {left[:5]}")
    with torch.no_grad():
        for their_key, (module, name) in keys.items():
            value, state = theirs[their_key], module.state_dict()
            if name.startswith("qkv."):            # (3C, ...) interleaved c*3 + {q, k, v}
                kind = name.partition(".")[2]
                for j, part in enumerate("qkv"):
                    target = state[f"{part}.{kind}"]
                    target.copy_(value[j::3].reshape(target.shape))
                continue
            state[name].copy_(value.reshape(state[name].shape))
    return len(keys)


def check_network(networks, rows: list) -> tuple:
    """NCSN++ against SongUNet; returns both networks (same weights) and SongUNet's
    arguments."""
    torch.manual_seed(3)
    ours, song = experiment_network()
    song_net = networks.SongUNet(**song).eval()
    with torch.no_grad():                          # off the init's ~0 branches
        for p in song_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n = load_song_unet_weights(ours, song_net, song)
    ours.eval()
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours, song_net)]
    rows.append((f"NCSN++ (experiment=edm_cifar10_ve, small): parameters {counts[0]} here, "
                 f"{counts[1]} in SongUNet; {n} tensors mapped", float(counts[0] - counts[1]),
                 float(counts[0] - counts[1]) / counts[1]))
    full, full_song = experiment_network(small=False)
    counts = [sum(p.numel() for p in m.parameters())
              for m in (full, networks.SongUNet(**full_song))]
    rows.append((f"NCSN++ (experiment=edm_cifar10_ve, full size): parameters {counts[0]} here, "
                 f"{counts[1]} in SongUNet", float(counts[0] - counts[1]),
                 float(counts[0] - counts[1]) / counts[1]))
    c_noise = torch.linspace(-6.0, 5.0, 12)        # log(sigma)/4 and log(sigma/2) ranges
    x = torch.randn(len(c_noise), 3, song["img_resolution"], song["img_resolution"])
    with torch.no_grad():
        F_song = song_net(x, c_noise, class_labels=None)
        F_ours = ours(x, c_noise.exp())            # ncsn's networks take sigma_in = exp(c)
    rows.append(("NCSN++ F(x; c_noise): ncsn's against SongUNet, same weights",
                 *difference(F_ours, F_song)))
    # float32's rounding, not the network (SongUNet's attention casts to float32 itself):
    with torch.no_grad():
        F64 = [m.double()(*args) for m, args in ((song_net, (x.double(), c_noise.double(), None)),
                                                  (ours, (x.double(), c_noise.double().exp())))]
    song_net.float(), ours.float()
    rows.append(("NCSN++ F(x; c_noise), both in float64", *difference(F64[1], F64[0])))
    for kind in ("edm", "ve"):
        edm_net = networks.EDMPrecond if kind == "edm" else networks.VEPrecond
        edm_net = edm_net(img_resolution=song["img_resolution"], img_channels=3,
                          model_type="SongUNet", **{k: v for k, v in song.items() if k not in (
                              "img_resolution", "in_channels", "out_channels")}).eval()
        edm_net.model.load_state_dict(song_net.state_dict())
        wrapped = (EDMPrecond(ours, 0.5) if kind == "edm" else VEPrecond(ours)).eval()
        sigma = SIGMAS[::4]
        xs = torch.randn(len(sigma), 3, song["img_resolution"], song["img_resolution"]) * (
            0.5 + sigma[:, None, None, None])
        with torch.no_grad():
            rows.append((f"{kind}: D(x; sigma), NCSN++ as SongUNet, {len(sigma)} sigmas",
                         *difference(wrapped.denoise(xs, sigma), edm_net(xs, sigma))))
    check_augment_labels(networks, ours, song_net, song, rows)
    return ours, song_net, song


def edm_pipe(edm_augment, p: float):
    """EDM's AugmentPipe as train.py --augment=p builds it."""
    return edm_augment.AugmentPipe(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                                   translate_frac=1)


def check_augment(edm_augment, rows: list) -> None:
    """EDM's AugmentPipe and ncsn's from the same seed on the same images: images and labels."""
    images = torch.rand(BATCH, 3, 32, 32) * 2 - 1           # [-1, 1], as EDM's loop
    for p in (0.12, 1.0):
        torch.manual_seed(4)
        theirs, their_labels = edm_pipe(edm_augment, p)(images)
        torch.manual_seed(4)
        ours, our_labels = AugmentPipe(p=p)(images)
        applied = (their_labels != 0).any(dim=1).sum().item()
        rows.append((f"augment p={p}: images, batch {BATCH} of 3x32x32 ({applied} augmented)",
                     *difference(ours, theirs)))
        rows.append((f"augment p={p}: labels {tuple(our_labels.shape)}",
                     *difference(our_labels, their_labels)))


def check_augment_labels(networks, ours, song_net, song, rows: list) -> None:
    """SongUNet (augment_dim=9) and ncsn's NCSN++ (model.augment_dim=9), same weights, given
    the same augmentation labels: F, and D through EDMPrecond."""
    c_noise = torch.linspace(-6.0, 5.0, 12)
    x = torch.randn(len(c_noise), 3, song["img_resolution"], song["img_resolution"])
    _, labels = AugmentPipe(p=1.0)(x)                        # every transformation applied
    with torch.no_grad():
        F_song = song_net(x, c_noise, class_labels=None, augment_labels=labels)
        F_ours = ours(x, c_noise.exp(), augment_labels=labels)
        F_plain = ours(x, c_noise.exp())
    rows.append((f"NCSN++ F(x; c_noise, augment labels {tuple(labels.shape)}): ncsn's against "
                 f"SongUNet (augment_dim={AUGMENT_DIM}), same weights",
                 *difference(F_ours, F_song)))
    rows.append(("NCSN++ F with the labels against F without (the labels' effect, not a "
                 "difference to EDM)", *difference(F_ours, F_plain)))
    edm_net = networks.EDMPrecond(img_resolution=song["img_resolution"], img_channels=3,
                                  model_type="SongUNet", **{k: v for k, v in song.items() if k not in (
                                      "img_resolution", "in_channels", "out_channels")}).eval()
    edm_net.model.load_state_dict(song_net.state_dict())
    sigma = SIGMAS[::4][:len(labels)]
    xs = x[:len(sigma)] * (0.5 + sigma[:, None, None, None])
    with torch.no_grad():
        rows.append((f"edm: D(x; sigma, augment labels), NCSN++ as SongUNet, {len(sigma)} sigmas",
                     *difference(EDMPrecond(ours, 0.5).denoise(xs, sigma, labels[:len(sigma)]),
                                 edm_net(xs, sigma, augment_labels=labels[:len(sigma)]))))


def check_augmented_loss(networks, edm_losses, edm_augment, pair, rows: list) -> None:
    """EDMLoss with EDM's AugmentPipe (p = 0.12) around SongUNet, and ncsn's loss=edm with
    loss.augment_p=0.12 around NCSN++ of the same weights, from the same seed: sigma, the
    augmentation and the noise drawn alike."""
    ours, song_net, song = pair
    edm_net = networks.EDMPrecond(img_resolution=song["img_resolution"], img_channels=3,
                                  model_type="SongUNet", **{k: v for k, v in song.items() if k not in (
                                      "img_resolution", "in_channels", "out_channels")}).eval()
    edm_net.model.load_state_dict(song_net.state_dict())
    wrapped = EDMPrecond(ours, 0.5).eval()
    loss_cfg = OmegaConf.create({"name": "edm", "P_mean": -1.2, "P_std": 1.2,
                                 "sigma_data": 0.5, "augment_p": 0.12})
    model_cfg = OmegaConf.create({"name": "ncsnpp", "embedding_type": "fourier",
                                  "precond": "edm", "augment_dim": AUGMENT_DIM})
    objective = registry.build_objective(loss_cfg, model_cfg, geometric_sigmas(80.0, 0.002, 18))
    n = 16
    y = torch.rand(n, 3, song["img_resolution"], song["img_resolution"]) * 2 - 1
    torch.manual_seed(6)
    reference = edm_losses.EDMLoss()(net=edm_net, images=y, labels=None,
                                     augment_pipe=edm_pipe(edm_augment, 0.12))
    torch.manual_seed(6)
    per_sample, _ = objective(wrapped, y)
    rows.append((f"loss=edm loss.augment_p=0.12, NCSN++ as SongUNet: per-sample loss, batch {n}",
                 *difference(per_sample, reference.flatten(1).sum(1))))
    their_grad, = torch.autograd.grad(reference.sum() / n, [edm_net.model.map_augment.weight])
    our_grad, = torch.autograd.grad(per_sample.mean(), [ours.map_augment.weight])
    rows.append(("loss=edm loss.augment_p=0.12: gradient of the batch loss in map_augment",
                 *difference(our_grad, their_grad)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edm", type=Path, required=True, help="a checkout of NVlabs/edm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    networks, edm_losses, edm_augment = load_edm(args.edm)
    networks.Tiny, networks.Probe, networks.NcsnUNet = Tiny, Probe, NcsnUNet
    rows: list = []
    for kind in ("edm", "ve"):
        check_precond(networks, kind, rows)
    pair = check_network(networks, rows)
    check_loss(networks, edm_losses, "edm", "edm", rows)
    check_loss(networks, edm_losses, "ve_edm", "ve", rows)
    check_augment(edm_augment, rows)
    check_augmented_loss(networks, edm_losses, edm_augment, pair, rows)
    print("| compared (float32) | max abs difference | relative (to EDM's max abs value) |")
    print("|---|---|---|")
    for name, diff, rel in rows:
        print(f"| {name} | {diff:.2g} | {rel:.2g} |")


if __name__ == "__main__":
    main()
