"""The training loop: resume equality, checkpoints, NaN handling, objectives end to end."""
import logging
import math
import signal

import pytest
import torch

from ncsn import registry
from ncsn import training
from ncsn.checkpoint import load_checkpoint
from ncsn.data import infinite_batches
from ncsn.registry import ConfigError
from conftest import TINY, compose_train


def weights(path):
    ckpt = load_checkpoint(path)
    return ckpt["model"], ckpt["ema"], ckpt["step"]


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    straight = training.train(compose_train(TINY + ["trainer.n_steps=60"]), tmp_path / "a")
    half = compose_train(TINY + ["trainer.n_steps=30"])
    training.train(half, tmp_path / "b")
    resumed = training.train(compose_train(TINY + ["trainer.n_steps=60", "trainer.resume=true"]),
                             tmp_path / "b")
    (model_a, ema_a, step_a), (model_b, ema_b, step_b) = weights(straight), weights(resumed)
    assert step_a == step_b == 60
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key


def test_run_interrupted_by_a_signal_resumes_to_the_same_weights(tmp_path, monkeypatch):
    # A cosine schedule and pictures in between: the resumed run must continue the same
    # schedule, and drawing pictures must not disturb the training random stream.
    extra = ["optim.schedule=cosine", "optim.warmup=5", "trainer.sample_every=15",
             "trainer.n_plot_samples=32"]
    straight = training.train(compose_train(TINY + extra), tmp_path / "a")
    real = training.train_step

    def signalled(run, x, *shard):
        stats = real(run, x, *shard)
        if run.step == 25:
            run.stop_signal = signal.SIGTERM                      # as the handler would
        return stats
    monkeypatch.setattr(training.loop, "train_step", signalled)
    with pytest.raises(training.TrainingInterrupted) as stopped:
        training.train(compose_train(TINY + extra), tmp_path / "b")
    assert stopped.value.step == 25
    monkeypatch.setattr(training.loop, "train_step", real)
    resumed = training.train(compose_train(TINY + extra + ["trainer.resume=true"]), tmp_path / "b")
    for key, value in weights(straight)[0].items():
        assert torch.equal(value, weights(resumed)[0][key]), key


def test_resume_refuses_a_different_model(tmp_path):
    training.train(compose_train(TINY + ["trainer.n_steps=20"]), tmp_path)
    with pytest.raises(ConfigError, match="model"):
        training.train(compose_train(TINY + ["trainer.resume=true", "model.hidden=16"]), tmp_path)


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(Exception, match="trainer.resume=true but there is no .*last.pt"):
        training.train(compose_train(TINY + ["trainer.resume=true"]), tmp_path)


def test_resume_from_a_path_continues_another_runs_checkpoint(tmp_path):
    # trainer.resume=PATH: any run's checkpoint, continued in this run's own folder, to the
    # weights the uninterrupted run reaches.
    straight = training.train(compose_train(TINY + ["trainer.n_steps=40"]), tmp_path / "a")
    training.train(compose_train(TINY + ["trainer.n_steps=40", "trainer.ckpt_every=20"]),
                   tmp_path / "b")
    step_20 = tmp_path / "b" / "checkpoints" / "step_00000020.pt"
    resumed = training.train(compose_train(TINY + ["trainer.n_steps=40",
                                                   f"trainer.resume={step_20}"]), tmp_path / "c")
    assert resumed == tmp_path / "c" / "checkpoints" / "last.pt"
    assert weights(resumed)[2] == 40
    for key, value in weights(straight)[0].items():
        assert torch.equal(value, weights(resumed)[0][key]), key
    with pytest.raises(Exception, match=r"trainer.resume=nope.pt: checkpoint not found: "):
        training.train(compose_train(TINY + ["trainer.resume=nope.pt"]), tmp_path / "d")


def test_a_corrupt_last_pt_falls_back_to_the_newest_readable_step_file(tmp_path, caplog):
    straight = training.train(compose_train(TINY + ["trainer.n_steps=60"]), tmp_path / "a")
    half = TINY + ["trainer.n_steps=30", "trainer.ckpt_every=10", "trainer.keep_last=3"]
    training.train(compose_train(half), tmp_path / "b")
    ckpt_dir = tmp_path / "b" / "checkpoints"
    # A crash mid-write leaves last.pt (and its own step file: they are one file) truncated.
    (ckpt_dir / "last.pt").unlink()
    (ckpt_dir / "step_00000030.pt").write_bytes(b"PK\x03\x04 truncated")
    (ckpt_dir / "last.pt").hardlink_to(ckpt_dir / "step_00000030.pt")
    with caplog.at_level(logging.WARNING, logger="ncsn.training"):
        resumed = training.train(compose_train(TINY + ["trainer.n_steps=60"]), tmp_path / "b")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "last.pt cannot be read" in warning and "(the same file as step_00000030.pt)" in \
        warning and "resuming from" in warning and "step_00000020.pt" in warning
    for key, value in weights(straight)[0].items():
        assert torch.equal(value, weights(resumed)[0][key]), key
    # Nothing readable at all: one line naming every file tried, and nothing overwritten.
    for path in ckpt_dir.glob("*.pt"):
        path.write_bytes(b"garbage")
    with pytest.raises(Exception, match="no checkpoint in .* can be read .*trainer.resume=false"):
        training.train(compose_train(TINY + ["trainer.n_steps=90"]), tmp_path / "b")
    assert all(p.read_bytes() == b"garbage" for p in ckpt_dir.glob("*.pt"))


def test_checkpoints_are_plain_and_only_the_last_k_are_kept(tmp_path):
    training.train(compose_train(TINY + ["trainer.n_steps=100", "trainer.ckpt_every=10",
                                         "trainer.keep_last=2"]), tmp_path)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["last.pt", "step_00000090.pt", "step_00000100.pt"]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 100 and ckpt["config"]["trainer"]["keep_last"] == 2
    assert isinstance(ckpt["config"], dict) and ckpt["sigmas"].shape == (10,)
    assert (tmp_path / "config.yaml").is_file()


def test_run_writes_tensorboard_and_2d_pictures(tmp_path):
    training.train(compose_train(TINY + ["trainer.n_plot_samples=200"]), tmp_path)
    for name in ("score_field", "samples", "trajectories"):
        assert (tmp_path / "pictures" / f"{name}.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/steps_per_sec", "test/loss"):
        assert tag in tags
    assert sum(t.startswith("loss_per_sigma/") for t in tags) == 10
    assert len(events.Scalars("train/loss")) == 4                 # every 10 of 40 steps


def test_nan_loss_stops_with_step_and_sigma_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = compose_train(TINY)
    real = training.train_step

    def poisoned(run, x, *shard):
        if run.step == 25:                                        # after the step-20 checkpoint
            x = x.clone()
            x[0, 0] = math.nan
        return real(run, x, *shard)
    monkeypatch.setattr(training.loop, "train_step", poisoned)
    with pytest.raises(training.NonFiniteLossError, match=r"loss became nan at step 26 at sigma \d"):
        training.train(cfg, tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 20


def test_learning_rate_schedule():
    cfg = compose_train(["optim.lr=1.0", "optim.warmup=10", "optim.schedule=cosine"]).optim
    assert training.learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert training.learning_rate(10, cfg, 110) == pytest.approx(1.0)
    assert training.learning_rate(60, cfg, 110) == pytest.approx(0.5)
    assert training.learning_rate(110, cfg, 110) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("overrides", [
    ["loss=dsm", "model=mlp", "sampler=langevin"],
    ["loss=ssm", "model=mlp", "sampler=langevin"],
    ["loss=ssm_vr", "model=mlp", "sampler=langevin", "loss.projection=rademacher"],
    ["loss=exact_sm", "model=mlp", "sampler=langevin"],
    ["loss=ssm", "loss.annealed=true"],
    ["loss=exact_sm", "loss.annealed=true"],
    ["model.embedding=multiplicative", "model.scale_by_sigma=true"],
])
def test_every_objective_trains_and_lowers_its_loss(tmp_path, overrides):
    base = [o for o in TINY if not o.startswith("sampler.")] if "sampler=langevin" in overrides else TINY
    cfg = compose_train(base + overrides + ["trainer.n_steps=150", "optim.lr=3e-3",
                                            "dataset=gaussian_mixture"])
    run = training.build_run(cfg, tmp_path)
    torch.manual_seed(0)
    x = next(iter(torch.utils.data.DataLoader(run.data.test, batch_size=128)))[0]
    before = torch.stack([run.objective(run.net, x)[0].mean().detach() for _ in range(8)]).mean()
    training.train(cfg, tmp_path)
    trained = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    run.net.load_state_dict(trained["model"])
    after = torch.stack([run.objective(run.net, x)[0].mean().detach() for _ in range(8)]).mean()
    assert after < before


@pytest.mark.parametrize("overrides,message", [
    (["loss=anneal_dsm", "model=mlp"], "needs a noise-conditional network"),
    (["loss=ssm", "model=cond_mlp"], "use model=mlp, or loss.annealed=true"),
    (["model=mlp", "loss=ssm", "sampler=annealed_langevin"], "use sampler=langevin"),
    (["noise.num_scales=many"], "num_scales"),
])
def test_incompatible_parts_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        training.build_run(compose_train(TINY + overrides), tmp_path)


@pytest.mark.parametrize("overrides,message", [
    (["loss=anneal_dsm", "model=mlp"], "needs a noise-conditional network"),
    (["loss=ssm", "model=cond_mlp"], "use model=mlp, or loss.annealed=true"),
    (["model=mlp", "loss=ssm", "sampler=annealed_langevin"], "use sampler=langevin"),
    (["model=nice", "loss=nll", "sampler=flow", "noise.continuous=true"], None),
    (["model=mlp", "loss=nll", "sampler=langevin"], "needs an exact log-likelihood"),
])
def test_part_problems_are_found_without_building(overrides, message):
    problems = registry.part_problems(compose_train(overrides))
    assert (problems == []) if message is None else any(message in p for p in problems)


def test_part_problems_names_every_problem_at_once():
    problems = registry.part_problems(compose_train(["model=mlp", "loss=anneal_dsm"]))
    assert len(problems) == 2
    assert "sampler=annealed_langevin" in problems[0] and "loss=anneal_dsm" in problems[1]


def test_auto_sigma_rules_measure_the_data(tmp_path):
    run = training.build_run(compose_train(TINY + ["noise.sigma_begin=auto",
                                                   "noise.num_scales=auto"]), tmp_path)
    data = run.data.train.tensors[0].double()
    assert run.sigmas[0].item() == pytest.approx(torch.cdist(data, data).max().item(), rel=1e-5)
    from ncsn.noise import num_scales_for
    assert len(run.sigmas) == num_scales_for(run.sigmas[0].item(), 0.01, 2)


def test_ema_starts_at_the_initial_weights_and_averages_every_step(tmp_path):
    # NCSNv2's EMA: shadow_0 = theta_0, shadow_k = mu shadow_(k-1) + (1 - mu) theta_k, so
    # shadow_k = mu^k theta_0 + sum_(j=1..k) (1 - mu) mu^(k-j) theta_j, for every scalar weight.
    mu, k = 0.9, 6
    run = training.build_run(compose_train(TINY + [f"trainer.ema_rate={mu}"]), tmp_path)
    name = next(n for n, _ in run.net.named_parameters())
    scalar = lambda module: dict(module.named_parameters())[name].detach().flatten()[0].item()
    thetas = [scalar(run.net)]
    assert scalar(run.ema.module) == thetas[0]
    batches = infinite_batches(run.data.train, 64, run.data_generator)
    for _ in range(k):
        training.train_step(run, next(batches))
        thetas.append(scalar(run.net))
    expected = mu ** k * thetas[0] + sum((1 - mu) * mu ** (k - j) * thetas[j]
                                         for j in range(1, k + 1))
    assert scalar(run.ema.module) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert thetas[-1] != pytest.approx(thetas[0])                     # the weight did move


def test_checkpoint_keeps_the_ema_as_a_plain_state_dict_and_reads_the_old_form(tmp_path):
    path = training.train(compose_train(TINY + ["trainer.n_steps=20"]), tmp_path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["ema"]) == set(ckpt["model"]) and ckpt["version"] == 2
    old_form = {f"module.{k}": v for k, v in ckpt["ema"].items()}
    old_form["n_averaged"] = torch.tensor(21)
    assert training.plain_ema_state(old_form).keys() == ckpt["ema"].keys()
    from ncsn.generate import model_from_checkpoint
    net = model_from_checkpoint({**ckpt, "ema": old_form})
    for key, value in net.state_dict().items():
        assert torch.equal(value, ckpt["ema"][key]), key


@pytest.mark.parametrize("on_device", ["true", "false"])
def test_image_runs_resume_mid_epoch_and_at_its_end_to_the_same_weights(tmp_path, on_device):
    # Images are drawn epoch by epoch (a permutation each, flips and dequantization noise
    # per image). The digits' 1,437 training images make 2 batches of 512 an epoch, so a
    # stop after step 3 resumes mid-epoch and one after step 4 at an epoch's end.
    images = ["dataset=digits", "model=unet_small", "model.ch=8", "noise.num_scales=4",
              "trainer.batch_size=512", "trainer.n_plot_samples=0", "trainer.device=cpu",
              "trainer.progress=false", "dataset.random_flip=true",
              "dataset.uniform_dequantization=true", f"trainer.data_on_device={on_device}"]
    straight = weights(training.train(compose_train(images + ["trainer.n_steps=6"]),
                                      tmp_path / "straight"))
    for stop in (3, 4):
        run_dir = tmp_path / f"stop{stop}"
        training.train(compose_train(images + [f"trainer.n_steps={stop}"]), run_dir)
        resumed = weights(training.train(compose_train(images + ["trainer.n_steps=6"]), run_dir))
        assert resumed[2] == straight[2] == 6
        for key, value in straight[0].items():
            assert torch.equal(value, resumed[0][key]), (stop, key)


def test_keep_best_keeps_the_weights_of_the_lowest_held_out_loss_across_a_resume(
        tmp_path, monkeypatch):
    scored = []                    # (step, held-out loss) as the trainer computed them
    original = training.test_loss

    def recording(run, **kwargs):
        loss = original(run, **kwargs)
        scored.append((run.step, loss))
        return loss
    monkeypatch.setattr(training.pictures, "test_loss", recording)
    best = ["trainer.keep_best=true", "trainer.sample_every=5", "optim.lr=3e-2"]
    training.train(compose_train(TINY + best), tmp_path)
    training.train(compose_train(TINY + best + ["trainer.n_steps=70"]), tmp_path)
    assert [step for step, _ in scored] == list(range(5, 75, 5))
    step, loss = min(scored, key=lambda s: s[1])
    kept = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert kept["step"] == step and kept["best_held_out_loss"] == pytest.approx(loss)
    # The kept weights score that loss again.
    run = training.build_run(compose_train(TINY + best), tmp_path / "again")
    training.load_state(run, kept)
    assert original(run) == pytest.approx(loss, rel=1e-6)


def test_a_finished_run_started_again_says_it_is_complete(tmp_path, caplog):
    training.train(compose_train(TINY), tmp_path)
    ckpts = tmp_path / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    with caplog.at_level(logging.INFO, logger="ncsn.training"):
        path = training.train(compose_train(TINY), tmp_path)       # trainer.resume=auto
    assert path == ckpts / "last.pt"
    assert "the run is complete" in caplog.text and "step 40 of trainer.n_steps=40" in caplog.text
    assert "step 40: checkpoint" not in caplog.text and "test loss" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()} == before


def test_sigterm_to_the_whole_process_group_checkpoints_despite_the_loader_workers(tmp_path):
    # timeout(1), a terminal's Ctrl-C and schedulers signal the whole group: the DataLoader
    # workers must leave the signal to the trainer, which checkpoints and exits 128 + 15.
    import os
    import subprocess
    import time

    from conftest import BIN

    run_dir = tmp_path / "run"
    args = ["dataset=digits", "model=unet_small", "model.ch=8", "noise.num_scales=4",
            "trainer.batch_size=32", "trainer.n_steps=100000", "trainer.log_every=5",
            "trainer.n_plot_samples=0", "trainer.device=cpu", "trainer.data_on_device=false",
            "dataset.num_workers=2", f"hydra.run.dir={run_dir}"]
    with (tmp_path / "err.txt").open("w") as err:
        job = subprocess.Popen([str(BIN / "ncsn-train"), *args], stdout=subprocess.DEVNULL,
                               stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        log, deadline = run_dir / "train.log", time.time() + 120
        while not (log.is_file() and "step 10/" in log.read_text()):
            assert job.poll() is None and time.time() < deadline, (tmp_path / "err.txt").read_text()
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGTERM)
        assert job.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "err.txt").read_text()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] >= 10
