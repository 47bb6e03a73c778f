"""ncsn-import: the authors' checkpoints (ermongroup/ncsn, ermongroup/ncsnv2) as ncsn checkpoints.

The reference files are written here, from freshly initialised ncsn networks, by the inverse
of the import mapping (``export_state``), in the runners' layouts: a list of state dicts
under DataParallel's ``module.`` names, with the run's config.yml.
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import yaml

from conftest import run_cli
from ncsn.checkpoint import load_checkpoint
from ncsn.generate import model_from_checkpoint
from ncsn.nets.layers import CondInstanceNorm2dPlus
from ncsn.nets.ncsn import NCSN
from ncsn.nets.ncsnv2 import NCSNv2
from ncsn.reference import (ReferenceFormatError, export_state, import_reference,
                            load_reference_config, reference_sigmas)
from ncsn.registry import ConfigError

SIGMA = dict(sigma_begin=1.0, sigma_end=0.01)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ncsn_config(dataset="CIFAR10", image_size=8, channels=3, ngf=4, num_classes=3,
                logit_transform=False) -> dict:
    """A config in the shape of ncsn's configs/anneal.yml."""
    return {"training": {"batch_size": 128, "n_iters": 200001, "snapshot_freq": 5000,
                         "algo": "dsm", "anneal_power": 2.0},
            "data": {"dataset": dataset, "image_size": image_size, "channels": channels,
                     "logit_transform": logit_transform, "random_flip": True},
            "model": {**SIGMA, "num_classes": num_classes, "batch_norm": False, "ngf": ngf},
            "optim": {"weight_decay": 0.0, "optimizer": "Adam", "lr": 1e-3, "beta1": 0.9,
                      "amsgrad": False}}


def ncsnv2_config(dataset="CIFAR10", image_size=8, ngf=4, num_classes=3, rescaled=False,
                  ema=True, **data) -> dict:
    """A config in the shape of ncsnv2's configs/cifar10.yml."""
    return {"training": {"batch_size": 128, "n_iters": 300001, "snapshot_freq": 5000,
                         "anneal_power": 2},
            "sampling": {"batch_size": 100, "data_init": False, "step_lr": 6.2e-6,
                         "n_steps_each": 5, "denoise": True},
            "data": {"dataset": dataset, "image_size": image_size, "channels": 3,
                     "logit_transform": False, "uniform_dequantization": False,
                     "gaussian_dequantization": False, "random_flip": True,
                     "rescaled": rescaled, **data},
            "model": {**SIGMA, "num_classes": num_classes, "ema": ema, "ema_rate": 0.999,
                      "spec_norm": False, "sigma_dist": "geometric",
                      "normalization": "InstanceNorm++", "nonlinearity": "elu", "ngf": ngf},
            "optim": {"weight_decay": 0.0, "optimizer": "Adam", "lr": 1e-4, "beta1": 0.9,
                      "amsgrad": False, "eps": 1e-8}}


def namespace(tree: dict) -> argparse.Namespace:
    return argparse.Namespace(**{k: namespace(v) if isinstance(v, dict) else v
                                 for k, v in tree.items()})


def write_config(path, tree: dict, as_namespace: bool = True):
    """config.yml as the runners dump it (yaml.dump of the argparse.Namespace), or plain."""
    path.write_text(yaml.dump(namespace(tree) if as_namespace else tree,
                              default_flow_style=False))
    return path


@torch.no_grad()
def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    for p in net.parameters():
        p.add_(0.1 * torch.randn_like(p))
    return net


def prefixed(state: dict) -> dict:
    return {f"module.{k}": v for k, v in state.items()}


def write_ncsn_run(tmp_path, tree: dict, step: int = 700):
    """ncsn's anneal_runner: checkpoint_<step>.pth = [model, optimizer]."""
    shape = (tree["data"]["channels"], tree["data"]["image_size"], tree["data"]["image_size"])
    net = perturbed(NCSN(shape, reference_sigmas(tree["model"]), ngf=tree["model"]["ngf"]))
    optimizer = torch.optim.Adam(net.parameters())
    src = tmp_path / f"checkpoint_{step}.pth"
    torch.save([prefixed(export_state(net)), optimizer.state_dict()], src)
    return net, src, write_config(tmp_path / "config.yml", tree)


def write_ncsnv2_run(tmp_path, tree: dict, depth="standard", step=1500, as_namespace=True):
    """ncsnv2's ncsn_runner: [model (with its sigma buffer), optimizer, epoch, step, ema]."""
    size = tree["data"]["image_size"]
    sigmas = reference_sigmas(tree["model"])
    net = perturbed(NCSNv2((3, size, size), sigmas, ngf=tree["model"]["ngf"], depth=depth))
    shadow = perturbed(NCSNv2((3, size, size), sigmas, ngf=tree["model"]["ngf"], depth=depth))
    states = [prefixed({**export_state(net), "sigmas": sigmas}),
              torch.optim.Adam(net.parameters()).state_dict(), 4, step]
    if tree["model"]["ema"]:
        states.append(export_state(shadow))
    src = tmp_path / f"checkpoint_{step}.pth"
    torch.save(states, src)
    return net, shadow, src, write_config(tmp_path / "config.yml", tree, as_namespace)


def assert_same_weights(state: dict, net: torch.nn.Module):
    expected = net.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# ----------------------------------------------------------------------------- names
def test_conditional_norm_is_one_embedding_of_gamma_alpha_beta():
    net = perturbed(NCSN((3, 8, 8), reference_sigmas({**SIGMA, "num_classes": 3}), ngf=4))
    state = export_state(net)
    norm = net.refinenet.norm
    assert isinstance(norm, CondInstanceNorm2dPlus)
    embed = state["normalizer.embed.weight"]                          # (L, 3C)
    assert embed.shape == (3, 12)
    assert torch.equal(embed[:, :4], norm.gamma.weight)
    assert torch.equal(embed[:, 4:8], norm.alpha.weight)
    assert torch.equal(embed[:, 8:], norm.beta.weight)


def test_reference_names_of_the_pooling_and_dilated_blocks():
    ncsn = export_state(NCSN((3, 8, 8), reference_sigmas({**SIGMA, "num_classes": 3}), ngf=4))
    # res2 subsamples by mean pooling (ConvMeanPool wraps the conv), res3 by dilation
    for key in ("begin_conv.weight", "end_conv.bias", "res2.0.conv2.conv.weight",
                "res2.0.shortcut.conv.weight", "res3.0.conv2.weight", "res3.0.shortcut.weight",
                "res1.1.normalize2.embed.weight", "refine1.adapt_convs.0.2_2_conv.weight",
                "refine2.msf.convs.1.bias", "refine2.msf.norms.0.embed.weight",
                "refine3.crp.norms.1.embed.weight", "refine4.output_convs.3_2_norm.embed.weight"):
        assert key in ncsn, key
    deepest = export_state(NCSNv2((3, 16, 16), None, ngf=4, depth="deepest"))
    for key in ("res31.0.conv2.conv.weight", "refine31.msf.convs.0.weight",
                "normalizer.alpha", "res5.1.normalize1.gamma", "refine5.output_convs.3_2_conv.weight"):
        assert key in deepest, key
    assert not any("norm" in k for k in deepest if k.startswith("refine"))   # unnormalized


# ----------------------------------------------------------------------------- config.yml
def test_namespace_config_reads_as_nested_dicts(tmp_path):
    tree = ncsnv2_config()
    path = write_config(tmp_path / "config.yml", tree)
    assert "!!python/object:argparse.Namespace" in path.read_text()
    assert load_reference_config(path) == tree


def test_config_with_another_python_tag_is_refused(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("data: !!python/object/apply:os.system ['echo hacked']\nmodel: {}\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_reference_config(path)


# ----------------------------------------------------------------------------- import
def test_ncsn_checkpoint_round_trip(tmp_path):
    tree = ncsn_config(num_classes=4)
    net, src, config = write_ncsn_run(tmp_path, tree)
    ckpt = import_reference(src, config)
    assert_same_weights(ckpt["model"], net)
    assert ckpt["ema"] is None and ckpt["step"] == 700
    cfg = ckpt["config"]
    assert cfg["model"] == {"name": "ncsn", "ngf": 4, "activation": "elu", "rescale_input": True}
    assert cfg["dataset"]["name"] == "cifar10" and cfg["dataset"]["uniform_dequantization"]
    assert cfg["noise"] == {**cfg["noise"], "sigma_begin": 1.0, "sigma_end": 0.01, "num_scales": 4}
    assert cfg["sampler"]["step_lr"] == 2e-5 and cfg["sampler"]["n_steps_each"] == 100
    assert cfg["trainer"]["n_steps"] == 200000            # n_iters 200001: the last saved step
    assert not cfg["sampler"]["denoise"] and not cfg["trainer"]["ema"]
    # exp(linspace(log 1, log 0.01, 4)) in float64, then float32, as both runners compute it
    expected = torch.tensor(np.exp(np.linspace(np.log(1.0), np.log(0.01), 4))).float()
    assert torch.equal(ckpt["sigmas"], expected)


@pytest.mark.parametrize("depth, dataset, size", [
    ("standard", "CIFAR10", 8), ("deeper", "LSUN", 8), ("deepest", "FFHQ", 16)])
def test_ncsnv2_checkpoint_round_trip_with_ema(tmp_path, depth, dataset, size):
    tree = ncsnv2_config(dataset=dataset, image_size=size, category="tower")
    net, shadow, src, config = write_ncsnv2_run(tmp_path, tree, depth)
    ckpt = import_reference(src, config)
    assert_same_weights(ckpt["model"], net)
    assert_same_weights(ckpt["ema"], shadow)
    assert ckpt["step"] == 1500 and ckpt["data_shape"] == [3, size, size]
    cfg = ckpt["config"]
    assert cfg["model"]["depth"] == depth and cfg["model"]["rescale_input"]
    assert cfg["sampler"]["step_lr"] == 6.2e-6 and cfg["sampler"]["denoise"]
    assert cfg["trainer"]["ema"] and cfg["trainer"]["ema_rate"] == 0.999


def test_ncsnv2_plain_config_without_ema_and_rescaled_data(tmp_path):
    tree = ncsnv2_config(rescaled=True, ema=False)
    net, _, src, config = write_ncsnv2_run(tmp_path, tree, as_namespace=False)
    ckpt = import_reference(src, config)
    assert_same_weights(ckpt["model"], net)
    assert ckpt["ema"] is None
    cfg = ckpt["config"]
    assert not cfg["model"]["rescale_input"] and cfg["dataset"]["rescaled"]
    assert (cfg["sampler"]["init_low"], cfg["sampler"]["init_high"]) == (-1.0, 1.0)


def test_imported_network_is_the_exported_weights_behind_the_input_map(tmp_path):
    tree = ncsnv2_config(ema=False)
    net, _, src, config = write_ncsnv2_run(tmp_path, tree)
    ours = model_from_checkpoint(import_reference(src, config))
    x, sigma = torch.rand(2, 3, 8, 8), reference_sigmas(tree["model"])[[0, 2]]
    with torch.no_grad():
        torch.testing.assert_close(ours(x, sigma), net.eval()(2 * x - 1, sigma))


def test_source_and_result_load_with_weights_only_and_ncsn_sample_runs(tmp_path):
    tree = ncsnv2_config()
    _, _, src, config = write_ncsnv2_run(tmp_path, tree)
    out = tmp_path / "imported.pt"
    done = run_cli("ncsn-import", f"src={src}", f"config={config}", f"out={out}")
    assert done.returncode == 0, done.stderr
    torch.load(src, weights_only=True)
    assert load_checkpoint(out)["format"] == "ncsn"
    assert torch.load(out, weights_only=True)["source"]["layout"] == "ncsnv2"
    samples = tmp_path / "samples"
    done = run_cli("ncsn-sample", f"ckpt={out}", f"out={samples}", "n_samples=4",
                   "sampler.n_steps_each=1", "grid_size=4", "device=cpu")
    assert done.returncode == 0, done.stderr
    assert (samples / "samples.png").is_file()
    done = run_cli("ncsn-sample", f"ckpt={out}", f"out={tmp_path / 'interp'}",
                   "mode=interpolate", "interpolation.n_rows=1", "interpolation.n_interpolations=3",
                   "sampler.n_steps_each=1", "device=cpu")
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- bad input
def import_fails(src, config, match: str):
    """import_reference refuses with one line naming the problem (the CLI prints that line
    and exits with status 2: test_cli_reports_bad_input_in_one_line)."""
    with pytest.raises((ReferenceFormatError, ConfigError, FileNotFoundError)) as err:
        import_reference(src, config)
    assert match in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_files_of_another_layout_are_refused(tmp_path):
    config = write_config(tmp_path / "config.yml", ncsnv2_config())
    state = prefixed(export_state(NCSNv2((3, 8, 8), None, ngf=4)))
    cases = {"dict.pth": {"model": state}, "three.pth": [state, {}, 3],
             "bare.pth": state, "text.pth": None}
    for name, content in cases.items():
        if content is None:
            (tmp_path / name).write_text("not a checkpoint")
        else:
            torch.save(content, tmp_path / name)
    for name in ("dict.pth", "three.pth", "bare.pth"):
        import_fails(tmp_path / name, config, "another layout")
    import_fails(tmp_path / "text.pth", config, "weights_only")
    import_fails(tmp_path / "missing.pth", config, "not found")


def test_an_ncsn_checkpoint_is_not_imported_again(tmp_path):
    _, _, src, config = write_ncsnv2_run(tmp_path, ncsnv2_config())
    torch.save(import_reference(src, config), tmp_path / "ours.pt")
    import_fails(tmp_path / "ours.pt", config, "already an ncsn checkpoint")


@pytest.mark.parametrize("change, match", [
    ({"model": {"ngf": 8}}, "has shape"),                       # width
    ({"model": {"num_classes": 5}}, "sigma table"),             # NCSNv2's saved sigma buffer
    ({"data": {"dataset": "LSUN"}}, "missing keys"),            # another depth
])
def test_ncsnv2_config_that_does_not_fit_the_weights(tmp_path, change, match):
    _, _, src, _ = write_ncsnv2_run(tmp_path, ncsnv2_config())
    tree = ncsnv2_config()
    for section, values in change.items():
        tree[section].update(values)
    import_fails(src, write_config(tmp_path / "other.yml", tree), match)


def test_ncsn_config_that_does_not_fit_the_weights(tmp_path):
    _, src, _ = write_ncsn_run(tmp_path, ncsn_config(num_classes=3))
    other = write_config(tmp_path / "other.yml", ncsn_config(num_classes=10))
    import_fails(src, other, "has shape")               # the (L, 3C) embeddings


def test_unsupported_reference_settings_are_named(tmp_path):
    _, _, src, _ = write_ncsnv2_run(tmp_path, ncsnv2_config())
    for section, key, value in (("model", "nonlinearity", "lrelu"), ("model", "spec_norm", True),
                                ("model", "sigma_dist", "uniform"), ("data", "dataset", "IMAGENET")):
        tree = ncsnv2_config()
        tree[section][key] = value
        import_fails(src, write_config(tmp_path / "bad.yml", tree), key.split("_")[0])


def test_cli_reports_bad_input_in_one_line(tmp_path):
    _, _, src, config = write_ncsnv2_run(tmp_path, ncsnv2_config())
    torch.save({"model": {}}, tmp_path / "dict.pth")
    other = write_config(tmp_path / "other.yml", ncsnv2_config(ngf=8))
    out = tmp_path / "o.pt"
    for args, match in (([f"src={tmp_path / 'dict.pth'}", f"config={config}", f"out={out}"],
                         "another layout"),
                        ([f"src={src}", f"config={other}", f"out={out}"], "does not match"),
                        ([f"src={src}"], "missing config=..., out=...")):
        done = run_cli("ncsn-import", *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("ncsn-import: error:") and match in lines[0], lines[0]
        assert not out.exists()



def test_arguments_are_the_three_keys():
    from ncsn.cli.import_ import parse_args
    assert parse_args(["out=o.pt", "src=a.pth", "config=c.yml"]) == {
        "src": "a.pth", "config": "c.yml", "out": "o.pt"}
    with pytest.raises(ConfigError, match="unknown argument 'step=3'"):
        parse_args(["src=a", "config=b", "out=c", "step=3"])


def test_config_without_a_needed_key_names_it(tmp_path):
    _, _, src, _ = write_ncsnv2_run(tmp_path, ncsnv2_config())
    for section, key in (("data", "channels"), ("model", "sigma_begin"), ("sampling", "step_lr")):
        tree = ncsnv2_config()
        del tree[section][key]
        import_fails(src, write_config(tmp_path / "bad.yml", tree), f"lacks the key '{key}'")
