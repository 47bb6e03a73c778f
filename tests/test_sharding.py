"""Each rank does its share: data read per rank, flows' statistics over the global batch,
the EMA from initialised weights, dropout per rank, gradient accumulation (issue: Scale II).

Two gloo processes on the CPU stand for two GPUs; they must compute what one process with
the whole global batch computes, up to float rounding (a mean of two means is not bit-for-bit
the mean of all).
"""
from collections import Counter

import pytest
import torch

from ncsn import distributed, registry
from ncsn import training
from ncsn.checkpoint import load_checkpoint
from ncsn.data import training_batches
from ncsn.data.images import build_image_data
from conftest import TINY, compose_train
from test_distributed import assert_same_weights, count_opened_images, run_two_ranks
from test_image_data import write_image_folder

STEPS = 4
FOLDER = ["dataset=image_folder", "dataset.image_size=8", "dataset.num_workers=0",
          "dataset.load_test=false", "dataset.uniform_dequantization=true",
          "model=unet_small", "model.ch=8", "noise.num_scales=10", "noise.sigma_begin=1.0",
          "sampler.n_steps_each=1", f"trainer.n_steps={STEPS}", f"trainer.ckpt_every={STEPS}",
          "trainer.batch_size=8", "trainer.n_plot_samples=0", "trainer.device=cpu"]
# Small flows on the digits, by maximum likelihood, at a small learning rate: Adam moves a
# weight by about lr a step whatever the size of its gradient, so one whose gradient is near
# zero, and whose sign rounding flips, ends up to 2 lr a step apart (8e-7 here, within
# FLOW_ATOL); statistics taken on a shard instead of the global batch differ by far more
# (0.06 in an actnorm log-scale, 1e-2 in a running variance).
FLOW_LR, FLOW_ATOL = "optim.lr=1e-7", 1e-5
GLOW = ["experiment=glow_digits", FLOW_LR, "model.hidden=8", "model.depth=2", "trainer.batch_size=16",
        f"trainer.n_steps={STEPS}", f"trainer.ckpt_every={STEPS}", "trainer.n_plot_samples=0",
        "trainer.sample_every=0", "trainer.device=cpu"]
REALNVP_BATCH_NORM = ["experiment=realnvp_digits", FLOW_LR, "model.hidden=8", "model.n_hidden=1",
                      "model.norm=batch",
                      "trainer.batch_size=16", f"trainer.n_steps={STEPS}",
                      f"trainer.ckpt_every={STEPS}", "trainer.n_plot_samples=0",
                      "trainer.sample_every=0", "trainer.device=cpu"]


def one_process(overrides, run_dir):
    return load_checkpoint(training.train(compose_train(overrides), run_dir))


def two_ranks(tmp_path, overrides, fault=""):
    run_dir = tmp_path / "ranks"
    outcomes = run_two_ranks(tmp_path, overrides, [run_dir, run_dir], fault=fault)
    assert all("ok" in o for o in outcomes), outcomes
    return load_checkpoint(run_dir / "checkpoints" / "last.pt"), outcomes


# ----------------------------------------------------------------------------- data per rank
def test_each_rank_opens_only_its_rows_of_the_image_folder_and_ends_with_one_process(
        tmp_path, monkeypatch):
    from PIL import Image

    write_image_folder(tmp_path / "data" / "images", n_per_class=10, size=(12, 12))
    run = FOLDER + [f"dataset.root={tmp_path / 'data'}"]
    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", Image.open)          # put back when the block ends
        opened = count_opened_images()
        single = one_process(run, tmp_path / "single")
    assert len(opened) == STEPS * 8                         # a global batch a step
    ddp, outcomes = two_ranks(tmp_path, run, fault="count_opens")
    per_rank = [o["opened"] for o in outcomes]
    assert [len(p) for p in per_rank] == [STEPS * 4, STEPS * 4]   # half of them each
    assert Counter(per_rank[0]) + Counter(per_rank[1]) == Counter(opened)
    assert_same_weights(ddp, single)


@pytest.mark.parametrize("on_device", [False, True])
def test_rows_of_a_global_batch_do_not_depend_on_who_reads_them(on_device):
    # The digits with flips and dequantization noise: the rows a rank reads are the rows of
    # the whole batch, at every step, through either path and from any start.
    data = build_image_data({"name": "digits", "random_flip": True,
                             "uniform_dequantization": True, "num_workers": 0})

    def batches(rows=None, start=0):
        return training_batches(data, 16, torch.Generator(), "cpu", seed=5,
                                on_device=on_device, start_batch=start, rows=rows)
    whole, first, second = batches(), batches(slice(0, 8)), batches(slice(8, 16))
    resumed = batches(slice(8, 16), start=100)
    for step in range(101):
        x = next(whole)
        torch.testing.assert_close(torch.cat([next(first), next(second)]), x, rtol=0, atol=0)
    torch.testing.assert_close(next(resumed), x[8:], rtol=0, atol=0)


def test_a_run_started_on_two_ranks_resumes_on_one_as_if_it_never_stopped(tmp_path):
    overrides = TINY + ["trainer.batch_size=32", "trainer.ckpt_every=3"]
    straight = one_process(overrides + ["trainer.n_steps=6"], tmp_path / "straight")
    run_dir = tmp_path / "ranks"
    outcomes = run_two_ranks(tmp_path, overrides + ["trainer.n_steps=3"], [run_dir, run_dir])
    assert all("ok" in o for o in outcomes), outcomes
    resumed = one_process(overrides + ["trainer.n_steps=6"], run_dir)
    assert resumed["step"] == 6
    assert_same_weights(resumed, straight)


# ----------------------------------------------------------------------------- flows
def test_glow_on_two_ranks_is_glow_in_one_process(tmp_path):
    # Actnorm's data-dependent initialisation reduces its statistics over the global batch.
    single = one_process(GLOW, tmp_path / "single")
    ddp, _ = two_ranks(tmp_path, GLOW)
    assert_same_weights(ddp, single, atol=FLOW_ATOL)


def test_batch_normalised_realnvp_on_two_ranks_is_one_process(tmp_path):
    # RealNVP's batch normalisation over the global batch (synchronised), with the gradient
    # through the statistics of every rank's rows.
    single = one_process(REALNVP_BATCH_NORM, tmp_path / "single")
    ddp, _ = two_ranks(tmp_path, REALNVP_BATCH_NORM)
    assert_same_weights(ddp, single, atol=FLOW_ATOL)
    for name in ("running_mean", "running_var"):
        keys = [k for k in single["model"] if k.endswith(name)]
        assert keys and all(torch.allclose(ddp["model"][k], single["model"][k], atol=1e-5)
                            for k in keys)


def test_a_flows_ema_starts_from_its_initialised_weights(tmp_path):
    # After a few steps the EMA (rate 0.999) is still close to the weights actnorm's
    # initialisation gave: it scores within noise of the raw weights, instead of the
    # placeholders' (zero bias, unit scale) mostly.
    overrides = [o for o in GLOW if not o.startswith(("trainer.n_steps", "optim.lr"))] + [
        "trainer.ema=true", "trainer.n_steps=3", "optim.lr=1e-3"]
    run = training.build_run(compose_train(overrides), tmp_path)
    batches = training_batches(run.data, 16, run.data_generator, seed=0)
    for _ in range(3):
        x = next(batches)
        if run.step == 0:
            training.initialize_from_data(run, x)
        training.train_step(run, x)
    for name, value in run.ema.module.state_dict().items():
        if name.endswith(("bias", "log_scale")) and ".initialized" not in name:
            raw = run.module.state_dict()[name]
            assert torch.allclose(value, raw, atol=0.01), name        # 3 steps of lr 1e-3
    raw_loss = training.test_loss(run)
    run.net, ema_net = run.ema.module, run.net
    try:
        ema_loss = training.test_loss(run)
    finally:
        run.net = ema_net
    assert abs(ema_loss - raw_loss) < 0.02 * raw_loss


# ----------------------------------------------------------------------------- dropout
def test_dropout_draws_from_a_stream_of_each_ranks_own(tmp_path, monkeypatch):
    overrides = ["experiment=digits", "model.ch=8", "model.dropout=0.5",
                 "trainer.device=cpu", "trainer.batch_size=4"]
    run = training.build_run(compose_train(overrides), tmp_path)
    assert run.dropout is not None
    with torch.no_grad():                     # the U-Net's last convolution starts at zero
        for p in run.net.parameters():
            p.normal_(0.0, 0.2)
    x, sigma = torch.rand(4, 1, 8, 8), torch.full((4,), 0.5)

    def forward(rank: int, step: int) -> torch.Tensor:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        run.dropout.start_step(step)
        torch.manual_seed(0)
        out = run.net(x, sigma)
        # The global generator, the objectives', is where it would be without dropout.
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())
        return out.detach()
    assert torch.equal(forward(0, 7), forward(0, 7))          # deterministic: seed, rank, step
    assert not torch.equal(forward(0, 7), forward(1, 7))      # each rank its own masks
    assert not torch.equal(forward(0, 7), forward(0, 8))      # new masks every step


# ----------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("loss", ["anneal_dsm", "ssm"])
def test_gradient_accumulation_is_the_full_batch_in_one_step(tmp_path, loss):
    overrides = TINY + ["trainer.batch_size=32", "trainer.ema_rate=0.9"] + (
        ["loss=ssm", "loss.annealed=true"] if loss == "ssm" else [])
    weights, states = [], []
    for k in (1, 4):
        run = training.build_run(compose_train(overrides + [f"trainer.accumulate={k}"]),
                                 tmp_path)
        batches = training_batches(run.data, 32, run.data_generator)
        losses = [training.train_step(run, next(batches)).per_sample for _ in range(3)]
        weights.append((run.module.state_dict(), run.ema.module.state_dict(), losses))
        states.append(torch.get_rng_state())
    (model1, ema1, losses1), (model4, ema4, losses4) = weights
    for name in model1:
        torch.testing.assert_close(model4[name], model1[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ema4[name], ema1[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(losses1, losses4):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(states[0], states[1])      # the objectives' stream advanced alike


@pytest.mark.parametrize("overrides, message", [
    (["trainer.accumulate=3"], r"trainer.accumulate=3 must divide the 32 rows of "
                               r"trainer.batch_size=32; use one of \[1, 2, 4, 8, 16, 32\]"),
    (["trainer.accumulate=0"], "trainer.accumulate must be at least 1"),
    (["trainer.batch_size=0"], "trainer.batch_size must be a positive number"),
    (["trainer.batch_size=-1"], "trainer.batch_size must be a positive number"),
])
def test_batch_settings_that_cannot_work_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(registry.ConfigError, match=message):
        training.build_run(compose_train(TINY + ["trainer.batch_size=32"] + overrides), tmp_path)


def test_accumulating_a_batch_normalised_flow_is_refused(tmp_path):
    with pytest.raises(registry.ConfigError, match="normalise each micro-batch by its own"):
        training.build_run(compose_train(REALNVP_BATCH_NORM + ["trainer.accumulate=2"]),
                           tmp_path)


def test_loader_workers_are_at_most_the_cpus_this_process_may_use(monkeypatch):
    from ncsn import data

    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1})
    assert [data.usable_workers(n) for n in (0, 1, 2, 4, 64)] == [0, 1, 2, 2, 2]
