"""The commands as a user runs them: ncsn-train, ncsn-sample, and every bad input."""
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import BIN, TINY, compose_train, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small CLI training run shared by the sampling tests."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli("ncsn-train", *TINY, "trainer.n_steps=300", "trainer.n_plot_samples=200",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def test_train_writes_checkpoints_config_pictures_and_tensorboard(trained):
    assert (trained / "checkpoints" / "last.pt").is_file()
    assert (trained / ".hydra" / "config.yaml").is_file() and (trained / "config.yaml").is_file()
    assert (trained / "pictures" / "samples.png").is_file()
    assert any((trained / "tb").iterdir())
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 300 and ckpt["config"]["dataset"]["name"] == "swiss_roll"


def test_sample_writes_npz_and_png_in_data_space(trained, tmp_path):
    out = tmp_path / "out"
    result = run_cli("ncsn-sample", f"ckpt={trained}/checkpoints/last.pt", f"out={out}",
                     "n_samples=300", "batch_size=128", "save_trajectory=true",
                     "sampler.n_steps_each=3")
    assert result.returncode == 0, result.stderr
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (300, 2) and np.isfinite(samples).all()
    # Samples of the Swiss roll land near it, not at the wide N(0, sigma_begin^2) start.
    assert np.abs(samples).max() < 5
    assert (out / "samples.png").stat().st_size > 1000
    assert (out / "trajectories.png").is_file()


def test_sample_seed_makes_samples_reproducible(trained, tmp_path):
    args = [f"ckpt={trained}/checkpoints/last.pt", "n_samples=50", "sampler.n_steps_each=2"]
    a = run_cli("ncsn-sample", *args, f"out={tmp_path}/a", "seed=3")
    b = run_cli("ncsn-sample", *args, f"out={tmp_path}/b", "seed=3")
    c = run_cli("ncsn-sample", *args, f"out={tmp_path}/c", "seed=4")
    assert a.returncode == b.returncode == c.returncode == 0
    load = lambda d: np.load(tmp_path / d / "samples.npz")["samples"]
    assert np.array_equal(load("a"), load("b")) and not np.array_equal(load("a"), load("c"))


def test_sample_can_switch_sampler(trained, tmp_path):
    result = run_cli("ncsn-sample", f"ckpt={trained}/checkpoints/last.pt", f"out={tmp_path}",
                     "n_samples=20", "sampler=langevin", "sampler.n_steps=10")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "sampler=langevin (" in output and "n_steps=10" in output


def test_sample_changes_one_key_of_a_checkpoints_own_sampler(tmp_path):
    # A checkpoint that samples with pc: sampler.num_steps is pc's key, checked against pc's
    # schema (not the default annealed Langevin's), and its saved snr stays.
    from ncsn.training import train

    base = [o for o in TINY if not o.startswith("sampler.")]
    ckpt = train(compose_train(base + ["sampler=pc", "sampler.snr=0.2", "trainer.n_steps=5"]),
                 tmp_path / "run")
    result = run_cli("ncsn-sample", f"ckpt={ckpt}", f"out={tmp_path}/out", "n_samples=4",
                     "sampler.num_steps=3")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "sampler=pc (" in output and "snr=0.2" in output and "num_steps=3" in output
    assert "NFE: 6 network evaluations per sample" in output


def test_sample_help_shows_the_sampler_the_checkpoint_will_use(trained):
    import yaml

    ckpt = trained / "checkpoints" / "last.pt"
    result = run_cli("ncsn-sample", "--help", f"ckpt={ckpt}", "sampler.denoise=false")
    assert result.returncode == 0, result.stderr
    config = result.stdout.split("== Config (override any key with key=value) ==")[1]
    shown = yaml.safe_load(config.split("--cfg job")[0])["sampler"]
    saved = torch.load(ckpt, weights_only=True)["config"]["sampler"]
    assert shown == {**saved, "denoise": False}
    assert shown["n_steps_each"] == 5                   # as TINY trained it; the default is 100
    plain = run_cli("ncsn-sample", "--help")
    assert "the checkpoint's own saved sampler replaces these defaults" in plain.stdout


def one_line_error(result, code=2):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_checkpoint(tmp_path):
    line = one_line_error(run_cli("ncsn-sample", f"ckpt={tmp_path}/nope.pt", f"out={tmp_path}/o"))
    assert "checkpoint not found" in line and "nope.pt" in line


def test_truncated_checkpoint(trained, tmp_path):
    data = (trained / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    line = one_line_error(run_cli("ncsn-sample", f"ckpt={tmp_path}/cut.pt", f"out={tmp_path}/o"))
    assert "truncated, corrupt" in line


def test_foreign_checkpoint(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    line = one_line_error(run_cli("ncsn-sample", f"ckpt={tmp_path}/other.pt", f"out={tmp_path}/o"))
    assert "not an ncsn checkpoint" in line


def test_wrong_group_option_lists_the_valid_ones(tmp_path):
    result = run_cli("ncsn-train", "dataset=swisroll", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "swisroll" in result.stderr and "swiss_roll" in result.stderr
    assert "moons" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("override,key", [("trainer.n_step=5", "trainer.n_step"),
                                          ("+trainer.foo=1", "trainer.foo"),
                                          ("+dataset.nois=0.5", "dataset.nois")])
def test_unknown_key_is_named(tmp_path, override, key):
    result = run_cli("ncsn-train", override, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert key in result.stderr and "Traceback" not in result.stderr


def test_wrong_type_is_named(tmp_path):
    result = run_cli("ncsn-train", "trainer.n_steps=many", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "trainer.n_steps" in result.stderr and "many" in result.stderr


def test_incompatible_choice_is_one_line(tmp_path):
    line = one_line_error(run_cli("ncsn-train", "model=mlp", f"hydra.run.dir={tmp_path}"))
    assert "noise-conditional" in line


def test_help_lists_groups_and_cfg_prints_the_config():
    result = run_cli("ncsn-train", "--help")
    assert result.returncode == 0
    for group in ("dataset", "model", "noise", "loss", "sampler", "optim", "trainer", "experiment"):
        assert f"{group}:" in result.stdout
    assert "anneal_dsm" in result.stdout and "swiss_roll" in result.stdout
    result = run_cli("ncsn-train", "--cfg", "job", "loss=ssm_vr")
    assert result.returncode == 0 and "variance_reduction: true" in result.stdout


def test_sigint_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [str(BIN / "ncsn-train"), *TINY, "trainer.n_steps=1000000", "trainer.ckpt_every=1000000",
         f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while not list((run_dir / "tb").glob("events*")) and time.time() < deadline:
        time.sleep(0.2)                                           # training has started
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "trainer.resume=true" in stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < ckpt["step"] < 1000000
    resumed = run_cli("ncsn-train", *TINY, f"trainer.n_steps={ckpt['step'] + 10}",
                      "trainer.resume=true", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == ckpt["step"] + 10


def test_nan_loss_is_one_line_with_step_and_sigma(tmp_path):
    # An absurd learning rate drives the weights to infinity within a few steps.
    result = run_cli("ncsn-train", *TINY, "optim.lr=1e30", "trainer.ckpt_every=1",
                     f"hydra.run.dir={tmp_path}")
    line = one_line_error(result, code=1)
    assert "at step" in line and ("sigma" in line or "gradient" in line)
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] >= 1


# Each mistake: one line on stderr, exit status 2, no traceback, and no run folder left
# behind (the command is checked before Hydra makes outputs/DATE/TIME or eval/DATE_TIME).
MISTAKES = [
    ("ncsn-train", ["trainer.nsteps=10"], ["trainer.nsteps", "did you mean trainer.n_steps",
                                            "batch_size"]),
    ("ncsn-train", ["trainer.n_step=5"], ["trainer.n_step'", "trainer.n_steps"]),
    ("ncsn-train", ["+trainer.foo=1"], ["trainer.foo", "valid keys in trainer"]),
    ("ncsn-train", ["trainer.batch_size=-1"], ["trainer.batch_size", "-1"]),
    ("ncsn-train", ["trainer.batch_size=0"], ["trainer.batch_size", "got 0"]),
    ("ncsn-train", ["trainer.n_steps=-5"], ["trainer.n_steps", "-5"]),
    ("ncsn-train", ["trainer.n_steps=many"], ["trainer.n_steps", "many"]),
    ("ncsn-train", ["trainer.resume=runs/x/last.pt"], ["trainer.resume=runs/x/last.pt",
                                                       "checkpoint not found"]),
    ("ncsn-train", ["model=mlp", "loss=anneal_dsm"], ["2 problems", "sampler=annealed_langevin",
                                                      "loss=anneal_dsm"]),
    ("ncsn-train", ["dataset=swisroll", "trainer.nsteps=1"], ["dataset=swiss_roll", "nsteps"]),
    # a flow's likelihood of clamped, Gaussian-dequantized pixels is unbounded
    ("ncsn-train", ["experiment=nice_digits", "dataset.gaussian_dequantization=true"],
     ["loss=nll", "gaussian_dequantization=true", "uniform_dequantization=true"]),
    # experiment is optional in the defaults list: Hydra alone trained the default setup
    ("ncsn-train", ["experiment=swisroll"], ["did you mean experiment=swissroll"]),
    # A sweep is checked job by job before Hydra makes multirun/DATE/TIME.
    ("ncsn-train", ["-m", "trainer.nsteps=1,2"], ["trainer.nsteps", "did you mean trainer.n_steps"]),
    ("ncsn-train", ["-m", "seed=0,1", "trainer.batch_size=16,0"], ["trainer.batch_size", "got 0"]),
    ("ncsn-sample", [], ["ckpt="]),
    ("ncsn-sample", ["out=o", "n_smaples=3"], ["n_smaples", "n_samples"]),
    ("ncsn-sample", ["ckpt=nope.pt"], ["checkpoint not found: nope.pt"]),
    ("ncsn-sample", ["ckpt=nope.pt", "experiment=swissroll"], ["unknown key 'experiment'"]),
    ("ncsn-eval", [], ["ckpt=PATH"]),
    ("ncsn-eval", ["ckpt=nope.pt"], ["checkpoint not found: nope.pt"]),
]


@pytest.mark.parametrize("command,args,words", MISTAKES,
                         ids=[" ".join([c, *a]) for c, a, _ in MISTAKES])
def test_mistake_is_one_line_and_leaves_no_folder(tmp_path, command, args, words):
    line = one_line_error(run_cli(command, *args, cwd=tmp_path))
    assert line.startswith(f"{command}: error: ")
    for word in words:
        assert word in line, line
    assert list(tmp_path.iterdir()) == []
