"""The papers' setups: every experiment file composes and trains one step at a tiny size,
and each dataset's own defaults (configs/setup/) give the setup a researcher expects."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import TensorDataset

from ncsn import registry
from ncsn import training
from ncsn.checkpoint import load_checkpoint
from ncsn.cli.precheck import check_train
from ncsn.config import config_dir
from ncsn.data import Data
from ncsn.data.images import image_config, model_space
from conftest import compose_train

CONFIGS = Path(config_dir())
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONFIGS / "dataset").glob("*.yaml"))
IMAGE_SIZE = 16

# Small widths for each model option; everything else stays as the experiment sets it.
TINY_MODEL = {"ncsn": ["model.ngf=8"], "ncsnv2": ["model.ngf=8"],
              "unet": ["model.ch=8", "model.ch_mult=[1,2]", "model.attn_resolutions=[]"],
              "nice": ["model.hidden=16", "model.n_hidden=1"], "realnvp": ["model.hidden=8", "model.n_hidden=1"],
              "glow": ["model.hidden=8", "model.depth=1"],
              "ncsnpp": ["model.nf=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
                         "model.attn_resolutions=[]"]}
TINY_RUN = ["trainer.n_steps=1", "trainer.batch_size=4", "trainer.n_plot_samples=2",
            "trainer.device=cpu", "trainer.progress=false"]


def fake_images(dataset_cfg) -> Data:
    """Random images of the configured size in the configured model space, standing in for
    datasets that are not on this machine (their loaders have tests of their own)."""
    cfg = image_config(dataset_cfg)
    channels = 1 if cfg.name in ("mnist", "fashion_mnist", "digits") else 3
    x = torch.rand(16, channels, cfg.image_size, cfg.image_size)
    space = model_space(cfg)
    return Data(TensorDataset(space(x)), TensorDataset(space(x[:8])),
                shape=tuple(x.shape[1:]), kind="images", to_data_space=space.inverse)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_one_step_at_a_tiny_size(name, tmp_path, monkeypatch):
    cfg = compose_train([f"experiment={name}"])
    overrides = list(TINY_RUN)
    if "n_steps_each" in cfg.sampler:                    # not the flows' exact sampler
        overrides += ["sampler.n_steps_each=1"]
    if cfg.dataset.name in registry.TOY_DATASETS:
        overrides += ["dataset.n_samples=64", "dataset.n_test=16", "model.hidden=16"]
    else:
        overrides += TINY_MODEL[cfg.model.name]
        if cfg.dataset.name != "digits":                 # the digits ship with scikit-learn
            overrides += [f"dataset.image_size={IMAGE_SIZE}", "noise.num_scales=5"]
            monkeypatch.setattr(registry, "build_data", fake_images)
    cfg = compose_train([f"experiment={name}", *overrides])
    last = training.train(cfg, tmp_path)
    ckpt = load_checkpoint(last)
    assert ckpt["step"] == 1 and ckpt["config"]["model"]["name"] == cfg.model.name
    if len(ckpt["data_shape"]) == 3:
        for name in ("samples.png", "samples_00000001.png"):
            assert Image.open(tmp_path / "pictures" / name).size[0] > 1


@pytest.mark.parametrize("overrides", [[f"experiment={name}"] for name in EXPERIMENTS]
                         + [[f"dataset={name}"] for name in DATASETS])
def test_every_setup_passes_the_command_line_check(overrides):
    # ncsn-train runs check_train before Hydra starts: it must let every shipped setup through.
    check_train(compose_train(overrides))


def test_cifar10_with_annealed_dsm_alone_is_the_ncsnv2_setup():
    default = compose_train(["dataset=cifar10", "loss=anneal_dsm"])
    assert default == compose_train(["experiment=ncsnv2_cifar10"])
    c = OmegaConf.to_container(default)
    assert c["model"] == {"name": "ncsnv2", "ngf": 128, "depth": "standard", "activation": "elu",
                          "rescale_input": True, "precond": "none", "sigma_data": 0.5}
    noise = c["noise"]
    assert (noise["sigma_begin"], noise["sigma_end"], noise["num_scales"]) == (50, 0.01, 232)
    s = c["sampler"]
    assert (s["name"], s["step_lr"], s["n_steps_each"], s["denoise"]) == (
        "annealed_langevin", 6.2e-6, 5, True)


@pytest.mark.parametrize("dataset,experiment", [("celeba", "ncsnv2_celeba"),
                                                ("lsun", "ncsnv2_church"), ("mnist", "mnist"),
                                                ("digits", "digits")])
def test_dataset_defaults_match_their_paper_experiment(dataset, experiment):
    assert compose_train([f"dataset={dataset}"]) == compose_train([f"experiment={experiment}"])


def test_command_line_choices_win_over_the_dataset_setup():
    cfg = compose_train(["dataset=cifar10", "model=unet", "noise.num_scales=10"])
    assert cfg.model.name == "unet" and cfg.model.ch == 128 and cfg.noise.num_scales == 10
    assert cfg.noise.sigma_begin == 50                          # the rest of the setup stays
    assert compose_train(["experiment=ncsnv2_church", "model=ncsnv2"]).model.depth == "standard"


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "lsun"])
def test_another_model_drops_the_setups_network_settings(dataset):
    """The setup's model keys (rescale_input, NCSN's MNIST width) follow its own network;
    another network chosen on the command line composes without them."""
    assert compose_train([f"dataset={dataset}"]).model.rescale_input
    assert "rescale_input" not in compose_train([f"dataset={dataset}", "model=unet"]).model


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_has_a_setup(dataset):
    cfg = compose_train([f"dataset={dataset}"])
    if dataset in registry.TOY_DATASETS:                        # the 2-D defaults of old
        assert cfg.model.name == "cond_mlp" and cfg.noise.num_scales == 10
        assert cfg.sampler.init == "gaussian" and cfg.optim.lr == 1e-3
    else:
        assert registry.is_conditional(cfg.model) and cfg.sampler.init == "uniform"


def test_the_reference_networks_by_dataset():
    """ermongroup/ncsnv2's get_model: CIFAR-10 and CelebA the standard network, LSUN the
    deeper one, FFHQ the deepest; ermongroup/ncsn: the NCSN RefineNet for every dataset."""
    depth = {"ncsnv2_cifar10": "standard", "ncsnv2_celeba": "standard", "ncsnv2_church": "deeper",
             "ncsnv2_bedroom": "deeper", "ncsnv2_tower": "deeper", "ncsnv2_ffhq": "deepest"}
    for name in EXPERIMENTS:
        c = compose_train([f"experiment={name}"])
        if name in depth:
            assert (c.model.name, c.model.depth) == ("ncsnv2", depth[name]), name
        elif name.startswith("ncsnpp"):
            assert c.model.name == "ncsnpp", name
        elif name.startswith("ncsn") or name == "mnist":
            assert c.model.name == "ncsn", name
    assert compose_train(["experiment=ncsnv2_bedroom"]).dataset.category == "bedroom"
    assert compose_train(["experiment=ncsnv2_tower"]).dataset.category == "tower"


def test_a_part_is_named_by_the_option_the_command_line_picked():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from ncsn.config import chosen_name

    assert chosen_name("model", "unet") == "unet"                 # outside a Hydra run
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["model=unet_small"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert chosen_name("model", cfg.model.name) == "unet_small (unet)"
        assert chosen_name("loss", cfg.loss.name) == cfg.loss.name
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_takes_another_loss_and_sampler_with_their_own_defaults(name):
    # An experiment's sampler settings (configs/setup/sampler/EXPERIMENT/) are for the sampler
    # it names: swapped on the command line, the other sampler and loss compose with their
    # own defaults instead of failing on the experiment's keys.
    own = compose_train([f"experiment={name}"])
    loss = "anneal_dsm" if own.loss.name == "edm" else "edm"
    sampler = "annealed_langevin" if own.sampler.name == "dpmpp_2m" else "dpmpp_2m"
    swapped = compose_train([f"experiment={name}", f"loss={loss}", f"sampler={sampler}"])
    assert swapped.loss == compose_train([f"loss={loss}"]).loss
    if sampler == "dpmpp_2m":
        assert swapped.sampler == compose_train([f"sampler={sampler}"]).sampler
    assert swapped.model == own.model and swapped.trainer == own.trainer


def test_an_experiments_sampler_settings_reach_its_own_sampler():
    assert compose_train(["experiment=ncsnv2_bedroom"]).sampler.step_lr == 1.8e-6
    assert compose_train(["experiment=ncsnv2_tower"]).sampler.step_lr == 1.8e-6
    assert compose_train(["experiment=ncsn_celeba"]).sampler.n_steps_each == 100
    assert compose_train(["experiment=ncsnpp_church"]).sampler.snr == 0.075
    assert compose_train(["experiment=ncsnv2_bedroom", "sampler.step_lr=1e-6"]
                         ).sampler.step_lr == 1e-6                # the command line still wins
    assert compose_train(["dataset=lsun"]).sampler.step_lr == 4.9e-6  # no experiment: the setup's
