"""Reference statistics for FID and KID: computed from image files or a dataset split,
cached, and read back -- ours or the published TTUR / pytorch-fid files as they are."""
from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from ncsn import registry
from ncsn.evaluate.options import EvalOptions, as_dict, progress
from ncsn.evaluate.streams import ImageScorer
from ncsn.metrics import load_stats
from ncsn.registry import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Reference:
    """Reference statistics: Inception feature mean (D,) and covariance (D, D), optionally
    a uniform subset of the features (M, D) for KID, and where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    n: int | None = None
    source: str = ""
    inception: str | None = None      # the Inception weights used, when known

    def describe(self) -> str:
        count = f" ({self.n} images)" if self.n is not None else ""
        return f"{self.source}{count}"


def save_reference(path: str | os.PathLike, ref: Reference) -> Path:
    """Write ``mu`` and ``sigma`` in the published TTUR / pytorch-fid ``.npz`` format, plus
    ``n``, ``inception`` and (for KID) ``features`` (M, D) float32, which those tools
    ignore. Atomic: a temporary file, then a rename."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": ref.mu, "sigma": ref.sigma}
    if ref.n is not None:
        arrays["n"] = np.int64(ref.n)
    if ref.inception is not None:
        arrays["inception"] = np.str_(ref.inception)
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_reference(path: str | os.PathLike) -> Reference:
    """Read a statistics ``.npz``: ours, or a published TTUR / pytorch-fid file as it is."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path} (compute them with "
                                f"ncsn-eval stats dataset=NAME ref_stats={path})")
    try:
        mu, sigma = load_stats(path)
    except KeyError as err:
        raise ConfigError(err.args[0]) from None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConfigError(f"cannot read reference statistics {path}: {err}") from None
    with np.load(path, allow_pickle=False) as f:
        features = f["features"] if "features" in f.files else None
        n = int(f["n"]) if "n" in f.files else None
        inception = str(f["inception"]) if "inception" in f.files else None
    return Reference(mu, sigma, features, n, str(path), inception)


def reference_from_batches(batches: Iterable[Tensor], model, options: EvalOptions,
                           source: str, n_total: int | None = None) -> Reference:
    """Statistics of image batches (B, C, H, W) in [0, 1] (for FID and KID)."""
    scorer = ImageScorer(model, ["fid", "kid"], options)
    for images in progress(batches, n_total, "reference", options):
        scorer.update(images)
    if scorer.stats.n < 2:
        raise ConfigError(f"reference statistics need at least 2 images, {source} has "
                          f"{scorer.stats.n}")
    return Reference(scorer.stats.mu, scorer.stats.sigma, scorer.features.rows.numpy(),
                     scorer.stats.n, source, model.weights_source)


def reference_dataset(dataset_cfg, split: str = "train", max_images: int | None = None,
                      seed: int = 0):
    """The images of a dataset split as reference data: no flips, no dequantization; at
    most ``max_images`` of them (a seeded random subset). Returns (dataset, to_data_space)."""
    from torch.utils.data import Subset

    if split not in ("train", "test"):
        raise ConfigError(f"split must be train or test, got {split!r}")
    cfg = OmegaConf.merge(OmegaConf.create(_image_dataset(dataset_cfg)), {
        "random_flip": False, "uniform_dequantization": False,
        "gaussian_dequantization": False, "load_test": split == "test"})
    data = registry.build_data(cfg)
    images = data.train if split == "train" else data.test
    if images is None or len(images) == 0:
        raise ConfigError(f"dataset={cfg.name} has no {split} split")
    if max_images is not None and max_images < len(images):
        picks = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images = Subset(images, sorted(picks[:max_images].tolist()))
    return images, data.to_data_space


def reference_from_dataset(dataset_cfg, model, options: EvalOptions, split: str = "train",
                           max_images: int | None = None, batch_size: int = 100) -> Reference:
    """Inception statistics of a dataset split (see :func:`reference_dataset`)."""
    from torch.utils.data import DataLoader

    from ncsn.data import first_tensor

    images, to_data = reference_dataset(dataset_cfg, split, max_images)
    workers = int(as_dict(dataset_cfg).get("num_workers", 0))
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers)
    name = as_dict(dataset_cfg)["name"]
    batches = (to_data(first_tensor(batch)) for batch in loader)
    return reference_from_batches(batches, model, options, f"{name} {split} split", len(images))


def stats_cache_path(dataset_cfg, split: str, options: EvalOptions,
                     max_images: int | None = None) -> Path:
    """``<stats_dir>/<dataset>[-variant]_<split>_<size>[_n<max>][_random-init].npz``; the
    variant tells LSUN categories, CelebA crops and image folders apart."""
    from ncsn.data.images import image_config, image_folder_paths

    cfg = image_config(_image_dataset(dataset_cfg))
    variant = {"lsun": lambda: f"-{cfg.category}",
               "celeba": lambda: f"-crop{cfg.crop_size}",
               "image_folder": lambda: "-" + hashlib.sha1(
                   str(image_folder_paths(cfg)[0].resolve()).encode()).hexdigest()[:8],
               }.get(cfg.name, lambda: "")()
    name = f"{cfg.name}{variant}_{split}_{cfg.image_size}"
    name += f"_n{max_images}" if max_images is not None else ""
    name += "_random-init" if options.inception_random_init else ""
    return stats_dir(options) / f"{name}.npz"


def _image_dataset(dataset_cfg) -> dict:
    """A dataset config as a dict, refused unless it holds images."""
    cfg = as_dict(dataset_cfg)
    if cfg["name"] in registry.TOY_DATASETS:
        raise ConfigError(f"dataset={cfg['name']} holds 2-D points: it has no Inception "
                          f"statistics (its metrics swd and energy draw fresh points)")
    return cfg


def stats_dir(options: EvalOptions) -> Path:
    if options.stats_dir is not None:
        return Path(options.stats_dir).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ncsn" / "stats"


def check_reference(ref: Reference, metrics: Sequence[str], options: EvalOptions) -> None:
    """Refuse statistics that cannot serve: no features for KID, or computed with the
    random test network while real weights are used (or the other way round)."""
    if "kid" in metrics and ref.features is None:
        raise ConfigError(f"metric=kid needs reference features, and {ref.source} holds only "
                          f"mu and sigma (as published files do); compute statistics with "
                          f"ncsn-eval stats dataset=NAME")
    if ref.inception is not None and ("random init" in ref.inception) != \
            options.inception_random_init:
        raise ConfigError(f"{ref.source} was computed with Inception weights "
                          f"'{ref.inception}', which do not match "
                          f"eval.inception_random_init={options.inception_random_init}")


def inception_reference(model, options: EvalOptions, metrics: Sequence[str],
                        ref_stats: str | None, dataset_cfg, split: str = "train",
                        max_images: int | None = None, batch_size: int = 100) -> Reference:
    """The reference for FID / KID: the file ``ref_stats``, else the cached statistics of
    ``dataset_cfg``'s split, computed and cached first if they are not there yet."""
    if ref_stats is not None:
        ref = load_reference(ref_stats)
    elif dataset_cfg is None:
        raise ConfigError("FID and KID of samples on disk need reference statistics: "
                          "ref_stats=PATH (e.g. a published fid_stats_cifar10_train.npz) or "
                          "dataset=NAME")
    else:
        path = stats_cache_path(dataset_cfg, split, options, max_images)
        ref = load_reference(path) if path.is_file() else None
        if ref is None or ("kid" in metrics and ref.features is None):
            log.info("computing reference statistics (cached in %s)", path)
            try:
                ref = reference_from_dataset(dataset_cfg, model, options, split,
                                             max_images, batch_size)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{err} -- or pass ref_stats=PATH") from None
            save_reference(path, ref)
            ref.source = str(path)
    check_reference(ref, metrics, options)
    return ref
