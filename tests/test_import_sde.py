"""ncsn-import format=score_sde: yang-song/score_sde_pytorch's NCSN++ checkpoints.

The score_sde files are written here from ncsn's own NCSNpp by the inverse of the import's
name mapping: run_lib.py's ``{'optimizer', 'model', 'ema', 'step'}`` with the network under
DataParallel's ``module.all_modules.<i>`` names (1x1 NIN weights as ``(in, out)`` matrices,
the ``sigmas`` buffer in float64), the EMA's shadow list in parameter order, and a real
Adam state dict.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import compose_train, run_cli
from ncsn.checkpoint import load_checkpoint
from ncsn.generate import model_from_checkpoint
from ncsn.nets.ncsnpp import NCSNpp, score_sde_keys
from ncsn.reference import ReferenceFormatError
from ncsn.reference_sde import SCORE_SDE_CONFIGS, import_score_sde
from ncsn.registry import ConfigError
from omegaconf import OmegaConf

TINY = {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
        "num_scales": 10}
LAYOUTS = {   # name: (released configuration, changes to its model section, image size)
    "cifar10": ("ve/cifar10_ncsnpp_continuous", {}, 8),
    "256px": ("ve/church_ncsnpp_continuous", {"ch_mult": [1, 1, 2]}, 16),
    "positional": ("ve/cifar10_ncsnpp", {}, 8),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(layout: str = "cifar10") -> dict:
    name, changes, size = LAYOUTS[layout]
    tree = copy.deepcopy(SCORE_SDE_CONFIGS[name])
    tree["model"].update(TINY, **changes)
    tree["data"]["image_size"] = size
    return tree


def our_net(tree: dict) -> NCSNpp:
    """ncsn's NCSNpp for ``tree``, with every weight perturbed (the 1e-10 branches would
    hide the body)."""
    model, size = tree["model"], tree["data"]["image_size"]
    sigmas = torch.tensor(np.exp(np.linspace(np.log(model["sigma_max"]),
                                             np.log(model["sigma_min"]), model["num_scales"])))
    fields = {k: model[k] for k in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions",
                                    "dropout", "resamp_with_conv", "fir", "fir_kernel",
                                    "skip_rescale", "resblock_type", "progressive",
                                    "progressive_input", "progressive_combine", "init_scale",
                                    "embedding_type", "scale_by_sigma")}
    if model["embedding_type"] == "fourier":
        fields["fourier_scale"] = model["fourier_scale"]
    net = NCSNpp((3, size, size), sigmas.float(), centered=tree["data"]["centered"], **fields)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def theirs(state: dict, net: NCSNpp) -> dict:
    """ncsn's state dict of ``net`` under score_sde's keys, in score_sde's order, NIN
    weights as ``(in, out)``."""
    out = {}
    for their_key, our_key in score_sde_keys(net).items():
        value = state[our_key]
        if ".NIN_" in their_key and their_key.endswith(".W"):
            value = value[:, :, 0, 0].t()
        out[their_key] = value.clone()
    return out


def write_run(tmp_path, tree: dict, as_json: bool = False, shift: float = 1.0):
    """score_sde's checkpoint_3.pth of a fresh NCSNpp, its config file; the EMA's shadow is
    the weights + ``shift``. Returns (net, ema net, checkpoint, config)."""
    net = our_net(tree)
    model = {f"module.{k}": v for k, v in theirs(net.state_dict(), net).items()}
    model["module.sigmas"] = torch.tensor(np.exp(np.linspace(
        np.log(tree["model"]["sigma_max"]), np.log(tree["model"]["sigma_min"]),
        tree["model"]["num_scales"])))                     # float64, as get_sigmas gives it
    ema_net = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema_net.parameters():
            p.add_(shift)
    trainable = {n for n, _ in net.named_parameters()}
    keys = score_sde_keys(net)
    shadow = [v for k, v in theirs(ema_net.state_dict(), ema_net).items() if keys[k] in trainable]
    trained = copy.deepcopy(net)                  # a real Adam state dict, of a copy
    optimizer = torch.optim.Adam(trained.parameters(), lr=2e-4)
    trained(torch.rand(1, 3, *net_size(tree)), torch.ones(1)).sum().backward()
    optimizer.step()
    src = tmp_path / "checkpoint_3.pth"
    torch.save({"optimizer": optimizer.state_dict(), "model": model,
                "ema": {"decay": 0.999, "num_updates": 150001, "shadow_params": shadow},
                "step": 150001}, src)
    config = tmp_path / ("config.json" if as_json else "config.yaml")
    config.write_text(json.dumps(tree) if as_json else yaml.safe_dump(tree))
    return net.eval(), ema_net.eval(), src, config


def net_size(tree):
    return tree["data"]["image_size"], tree["data"]["image_size"]


# ----------------------------------------------------------------------------- the import
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_weights_ema_and_scores_are_the_checkpoints(tmp_path, layout):
    tree = tiny_config(layout)
    net, ema_net, src, config = write_run(tmp_path, tree, as_json=layout == "256px")
    ckpt = import_score_sde(src, config)
    assert ckpt["step"] == 150001 and ckpt["source"]["layout"] == "score_sde"
    for ours, saved in ((net, ckpt["model"]), (ema_net, ckpt["ema"])):
        assert saved.keys() == ours.state_dict().keys()
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)
    if layout != "positional":    # the fixed Fourier frequencies: the model's, not shifted
        torch.testing.assert_close(ckpt["ema"]["fourier.W"], net.fourier.W, rtol=0, atol=0)
    sigmas = ckpt["sigmas"]
    assert sigmas[0] == 50 if layout != "256px" else sigmas[0] == 380
    x, sigma = torch.rand(3, 3, *net_size(tree)), sigmas[[0, 4, 9]]   # data in [0, 1]
    with torch.no_grad():
        for use_ema, original in ((False, net), (True, ema_net)):
            imported = model_from_checkpoint(ckpt, use_ema=use_ema)
            torch.testing.assert_close(imported(x, sigma), original(x, sigma), rtol=0, atol=0)


def test_the_input_is_data_in_0_1_and_the_network_maps_it(tmp_path):
    """data.centered false: ncsn's data stays in [0, 1] and the network sees 2x - 1; true:
    the data is rescaled to [-1, 1] and the network takes it as it is."""
    for centered in (False, True):
        tree = tiny_config()
        tree["data"]["centered"] = centered
        _, _, src, config = write_run(tmp_path, tree)
        cfg = import_score_sde(src, config)["config"]
        assert cfg["model"]["centered"] is centered and cfg["dataset"]["rescaled"] is centered


@pytest.mark.parametrize("name, experiment", [
    ("ve/cifar10_ncsnpp_continuous", "ncsnpp_cifar10"),
    ("ve/cifar10_ncsnpp_deep_continuous", "ncsnpp_deep_cifar10"),
    ("ve/celebahq_256_ncsnpp_continuous", "ncsnpp_celebahq256"),
    ("ve/church_ncsnpp_continuous", "ncsnpp_church"),
])
def test_a_released_configuration_is_its_experiment_file(name, experiment):
    from ncsn.reference_sde import translate_score_sde

    imported = translate_score_sde(copy.deepcopy(SCORE_SDE_CONFIGS[name]))
    composed = OmegaConf.to_container(compose_train([f"experiment={experiment}"]), resolve=True)
    for section in ("dataset", "model", "noise", "loss", "sampler", "optim", "trainer"):
        assert imported[section] == composed[section], section


def test_cli_writes_a_weights_only_checkpoint_that_ncsn_sample_takes(tmp_path):
    from ncsn.cli.import_ import main

    _, _, src, config = write_run(tmp_path, tiny_config())
    torch.load(src, weights_only=True)                   # Adam's state dict included
    out = tmp_path / "imported.pt"
    main([f"src={src}", "format=score_sde", f"config={config}", f"out={out}"])
    assert torch.load(out, weights_only=True)["source"]["layout"] == "score_sde"
    assert load_checkpoint(out)["format"] == "ncsn"
    samples = tmp_path / "samples"
    done = run_cli("ncsn-sample", f"ckpt={out}", f"out={samples}", "n_samples=2",
                   "grid_size=2", "device=cpu")      # score_sde's pc sampler, 10 levels
    assert done.returncode == 0, done.stderr
    assert (samples / "samples.png").is_file()


# ----------------------------------------------------------------------------- bad input
def import_fails(src, config, match: str):
    with pytest.raises((ReferenceFormatError, ConfigError, FileNotFoundError)) as err:
        import_score_sde(src, config)
    assert match in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_configurations_other_than_the_released_ve_ones_are_refused(tmp_path):
    _, _, src, config = write_run(tmp_path, tiny_config())
    import_fails(src, "vp/cifar10_ddpmpp_continuous", "VP-SDE")
    import_fails(src, "ve/cifar10_ncsnpp_huge", "no such score_sde VE configuration")
    import_fails(src, tmp_path / "missing.yaml", "config not found")
    for section, key, value, match in (
            ("training", "sde", "vpsde", "VE-SDE"), ("model", "name", "ddpm", "NCSN++"),
            ("model", "nonlinearity", "elu", "nonlinearity"),
            ("sampling", "probability_flow", True, "probability_flow"),
            ("sampling", "corrector", "ald", "corrector"),
            ("data", "dataset", "ImageNet", "data.dataset")):
        tree = tiny_config()
        tree[section][key] = value
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(tree))
        import_fails(src, bad, match)


def test_config_files_are_data_with_the_fields_score_sde_has(tmp_path):
    _, _, src, _ = write_run(tmp_path, tiny_config())
    bad = tmp_path / "bad.yaml"
    tree = tiny_config()
    del tree["model"]["nf"], tree["sampling"]["snr"]
    tree["model"]["width"] = 3
    bad.write_text(yaml.safe_dump(tree))
    import_fails(src, bad, "missing fields model.nf, sampling.snr; unknown fields model.width")
    tree = tiny_config()
    del tree["sampling"]
    bad.write_text(yaml.safe_dump(tree))
    import_fails(src, bad, "missing sections (mappings) sampling")
    bad.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    import_fails(src, bad, "cannot read")
    bad.write_text(yaml.safe_dump({**tiny_config(), "model": {**tiny_config()["model"],
                                                              "nf": "wide"}}))
    import_fails(src, bad, "wrong type")


def test_checkpoints_that_do_not_fit_are_refused(tmp_path):
    net, _, src, config = write_run(tmp_path, tiny_config())
    saved = torch.load(src, weights_only=True)
    cases = {"no_ema.pth": {k: v for k, v in saved.items() if k != "ema"},
             "no_model.pth": {k: v for k, v in saved.items() if k != "model"},
             "short_ema.pth": {**saved, "ema": {**saved["ema"],
                                                "shadow_params": saved["ema"]["shadow_params"][:-1]}},
             "list.pth": [saved["model"], {}, 1, 2]}
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    import_fails(tmp_path / "no_ema.pth", config, "not a score_sde checkpoint")
    import_fails(tmp_path / "no_model.pth", config, "not a score_sde checkpoint")
    import_fails(tmp_path / "list.pth", config, "not a score_sde checkpoint")
    import_fails(tmp_path / "short_ema.pth", config, "holds")
    import_fails(tmp_path / "text.pth", config, "weights_only")
    wider = tiny_config()
    wider["model"]["nf"] = 16
    other = tmp_path / "wider.yaml"
    other.write_text(yaml.safe_dump(wider))
    import_fails(src, other, "shape")
    deeper = tiny_config()
    deeper["model"]["num_res_blocks"] = 2
    other.write_text(yaml.safe_dump(deeper))
    import_fails(src, other, "missing keys")


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    """ncsn-import's own main, in this process: a refusal is one line and exit status 2."""
    from ncsn.cli.import_ import main

    _, _, src, config = write_run(tmp_path, tiny_config())
    out = tmp_path / "o.pt"
    for args, match in (([f"src={src}", "format=score_sde", "config=vp/cifar10_ddpm",
                          f"out={out}"], "VP-SDE"),
                        ([f"src={src}", f"config={config}", f"out={out}"], "format=score_sde"),
                        ([f"src={src}", "format=jax", f"config={config}", f"out={out}"],
                         "format='jax'")):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("ncsn-import: error:") and match in lines[0], lines[0]
        assert not out.exists()


def test_format_is_an_optional_fourth_key():
    from ncsn.cli.import_ import parse_args
    assert parse_args(["src=a", "format=score_sde", "config=b", "out=c"])["format"] == "score_sde"
    with pytest.raises(ConfigError, match="format='jax'"):
        parse_args(["src=a", "format=jax", "config=b", "out=c"])
