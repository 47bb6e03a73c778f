"""docs/REPRODUCING.md: its table of the papers' setups is what the experiment files compose
to, key by key, and the preprocessing it names computes what the reference runners do."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms

from ncsn.config import config_dir
from ncsn.data.images import UniformDequantize, build_image_data
from conftest import REPO, compose_train

DOC = REPO / "docs" / "REPRODUCING.md"
HEADER = ["experiment", "key", "value", "reference", "reference value"]
NOT_A_KEY = "—"                       # a reference setting that ncsn has no key for
ABSENT = object()

# The keys every setup's table must list (issue 7, part 4).
REQUIRED = {"dataset.image_size", "dataset.random_flip", "dataset.rescaled",
            "dataset.logit_transform", "dataset.uniform_dequantization", "model.name",
            "model.ngf", "model.rescale_input", "noise.sigma_begin", "noise.sigma_end",
            "noise.num_scales", "loss.anneal_power", "optim.lr", "optim.betas", "optim.eps",
            "optim.weight_decay", "optim.amsgrad", "trainer.batch_size", "trainer.n_steps",
            "trainer.ema", "trainer.ckpt_every", "sampler.step_lr", "sampler.n_steps_each",
            "sampler.denoise", "sampler.init", "sampler.init_low", "sampler.init_high"}
# The keys every NCSN++ setup's table must list (issue 16): score SDE's VE setups.
REQUIRED_NCSNPP = {"dataset.image_size", "dataset.random_flip", "dataset.rescaled",
                   "dataset.uniform_dequantization", "model.name", "model.nf", "model.ch_mult",
                   "model.num_res_blocks", "model.attn_resolutions", "model.dropout",
                   "model.fir", "model.skip_rescale", "model.resblock_type",
                   "model.progressive", "model.progressive_input", "model.fourier_scale",
                   "model.init_scale", "model.embedding_type", "model.scale_by_sigma",
                   "model.centered", "noise.sigma_begin", "noise.sigma_end", "noise.num_scales",
                   "noise.continuous", "noise.distribution", "loss.anneal_power", "optim.lr",
                   "optim.betas", "optim.eps", "optim.weight_decay", "optim.warmup",
                   "optim.grad_clip", "trainer.batch_size", "trainer.n_steps", "trainer.ema",
                   "trainer.ema_rate", "trainer.ckpt_every", "sampler.name", "sampler.predictor",
                   "sampler.snr", "sampler.n_corrector_steps", "sampler.denoise",
                   "sampler.init", "sampler.init_std"}

# The keys the Glow setup's table must list (issue 17): openai/glow's flags.
REQUIRED_GLOW = {"dataset.image_size", "dataset.random_flip", "dataset.rescaled",
                 "dataset.uniform_dequantization", "model.name", "model.n_levels",
                 "model.depth", "model.hidden", "model.lu", "model.coupling", "model.learn_top",
                 "loss.name", "optim.name", "optim.lr", "optim.betas", "optim.warmup",
                 "trainer.batch_size", "trainer.n_steps", "trainer.ema", "trainer.precision",
                 "sampler.name"}


def setup_rows(markdown: str) -> list[tuple[str, str, object]]:
    """``(experiment, key, value)`` for each row of the tables headed by ``HEADER`` whose key
    is an ncsn key; values are read as YAML (``true``, ``1.0e-4``, ``[0.9, 0.999]``)."""
    rows, in_table = [], False
    for line in markdown.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells == HEADER:
            in_table = True
        elif in_table and not set(cells[0]) <= {"-"}:
            experiment, key, value = (cell.strip("`") for cell in cells[:3])
            if key != NOT_A_KEY:
                rows.append((experiment, key, yaml.safe_load(value)))
    return rows


ROWS = setup_rows(DOC.read_text(encoding="utf-8"))
DOCUMENTED = sorted({experiment for experiment, _, _ in ROWS})


def test_the_table_reader_reads_only_ncsn_keys_of_setup_tables():
    text = "\n".join([
        "| a | b |", "|---|---|", "| x | y |", "",
        "| " + " | ".join(HEADER) + " |", "|---|---|---|---|---|",
        "| e | `optim.betas` | `[0.9, 0.999]` | f.yml: optim.beta1 | 0.9 |",
        "| e | — | 3 | f.yml: data.channels | 3 |",
        "| e | `sampler.step_lr` | `6.2e-6` | f.yml: sampling.step_lr | 0.0000062 |"])
    assert setup_rows(text) == [("e", "optim.betas", [0.9, 0.999]),
                                ("e", "sampler.step_lr", 6.2e-6)]


def test_every_paper_experiment_has_its_table():
    papers = {p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml")
              if p.stem.startswith("ncsn") or p.stem in ("mnist", "glow_cifar10")}
    assert set(DOCUMENTED) == papers


@pytest.mark.parametrize("experiment", DOCUMENTED)
def test_each_table_lists_the_setup_keys(experiment):
    listed = {key for name, key, _ in ROWS if name == experiment}
    required = (REQUIRED_NCSNPP if experiment.startswith("ncsnpp") else
                REQUIRED_GLOW if experiment.startswith("glow") else REQUIRED)
    assert required <= listed, f"{experiment} lacks {sorted(required - listed)}"


@pytest.mark.parametrize("experiment", DOCUMENTED)
def test_the_experiment_composes_to_the_documented_values(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    for name, key, documented in ROWS:
        if name != experiment:
            continue
        got = OmegaConf.select(cfg, key, default=ABSENT)
        assert got is not ABSENT, f"{experiment}: no key {key}"
        if OmegaConf.is_config(got):
            got = OmegaConf.to_container(got)
        assert got == documented, (f"experiment={experiment}: {key} is {got!r}, "
                                   f"docs/REPRODUCING.md says {documented!r}")


def test_uniform_dequantization_is_the_ncsn_runners():
    """ncsn's ``(255 x + u) / 256`` against ermongroup/ncsn's anneal_runner, which adds
    ``x * 255/256 + u/256`` to every batch, with the same draws u ~ U(0, 1)."""
    x = torch.randint(0, 256, (4, 3, 32, 32)).float() / 255
    torch.manual_seed(7)
    ours = UniformDequantize(256)(x)
    torch.manual_seed(7)
    u = torch.rand_like(x)
    reference = x * 255 / 256 + u / 256
    torch.testing.assert_close(ours, reference, rtol=0, atol=2 ** -23)


@pytest.mark.parametrize("crop_size,image_size,photo", [
    (140, 64, (178, 218)),      # NCSNv2's CelebA: CenterCrop(140), Resize(64)
    (140, 32, (178, 218)),      # NCSN's CelebA: CenterCrop(140), Resize(32)
    (None, 96, (341, 256))])    # NCSNv2's LSUN: Resize(s), CenterCrop(s)
def test_crop_and_resize_are_the_reference_runners(tmp_path, crop_size, image_size, photo):
    """ncsn's crop and resize (the steps of its CelebA, LSUN and image-folder loaders) give
    the tensor of the reference's torchvision chain, written out, on the same picture."""
    pixels = np.random.default_rng(0).integers(0, 256, (photo[1], photo[0], 3), dtype=np.uint8)
    for folder in ("train/faces", "test/faces"):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / folder / "0.png")
    data = build_image_data({"name": "image_folder", "root": str(tmp_path), "path": "train",
                             "test_path": "test", "image_size": image_size,
                             "crop_size": crop_size, "random_flip": False, "num_workers": 0})
    steps = ([transforms.CenterCrop(crop_size), transforms.Resize(image_size)] if crop_size
             else [transforms.Resize(image_size), transforms.CenterCrop(image_size)])
    reference = transforms.Compose([*steps, transforms.ToTensor()])(Image.fromarray(pixels))
    assert torch.equal(data.test[0][0], reference)
