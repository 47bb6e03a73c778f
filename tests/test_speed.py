"""Speed: every option gives the plain step's loss, the deferred finiteness check, batches
drawn on the device, trainer.num_threads=auto, the fused EMA, the sampling cost."""
import logging
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ncsn import training
from ncsn.checkpoint import load_checkpoint
from ncsn.registry import ConfigError
from ncsn.data import infinite_batches, training_batches
from ncsn.data.images import build_image_data
from conftest import TINY, compose_train
from test_image_data import (config, skip_md5, write_cifar10, write_mnist,  # noqa: F401
                             write_svhn)

PLAIN = ["trainer.precision=fp32", "trainer.channels_last=false", "trainer.fused_adam=false",
         "trainer.compile=false", "trainer.num_threads=1"]
# A small convolutional network on the 8x8 digits: channels-last changes its layout.
IMAGES = ["dataset=digits", "model=unet_small", "model.ch=8", "noise.num_scales=10",
          "noise.sigma_begin=1.0", "trainer.batch_size=16", "trainer.device=cpu"]


def two_steps(overrides, tmp_path):
    """Losses and weights after two steps from the same seed, batch and noise."""
    run = training.build_run(compose_train(overrides), tmp_path)
    x = next(infinite_batches(run.data.train, run.cfg.trainer.batch_size,
                              torch.Generator().manual_seed(0)))
    losses = []
    for step in range(2):
        torch.manual_seed(100 + step)                  # the same labels and noise each time
        losses.append(float(training.train_step(run, x).loss))
    weights = {k: v.detach().float().clone() for k, v in run.net.state_dict().items()}
    return losses, weights, run


@pytest.mark.parametrize("base, option, rtol", [
    (IMAGES, "trainer.precision=bf16", 2e-2),
    (IMAGES, "trainer.precision=fp16", 5e-3),
    (IMAGES, "trainer.channels_last=true", 1e-5),
    (IMAGES, "trainer.fused_adam=true", 1e-5),
    (TINY, "trainer.compile=true", 1e-5),
])
def test_every_cpu_speed_option_gives_the_plain_loss(tmp_path, base, option, rtol):
    plain_losses, plain_weights, _ = two_steps(base + PLAIN, tmp_path / "plain")
    losses, weights, run = two_steps(base + PLAIN + [option], tmp_path / "fast")
    assert losses == pytest.approx(plain_losses, rel=rtol)
    if option == "trainer.precision=fp16":
        # The gradient scaler starts at 2^16 and skips the steps whose scaled gradients
        # overflow; it halves its scale for each.
        assert run.speed.scaler.is_enabled() and run.speed.scaler.get_scale() <= 2.0 ** 16
        return
    # Adam moves a weight by about lr a step whatever the gradient's size (lr 2e-5, then 4e-5
    # in the warm-up): bf16's slightly different gradients may move a weight differently by
    # up to that much, no more.
    atol = 1e-4 if "bf16" in option else 1e-6
    for key, value in plain_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=atol)


def test_options_are_what_they_say(tmp_path, monkeypatch):
    run = training.build_run(compose_train(IMAGES + PLAIN + [
        "trainer.channels_last=true", "trainer.fused_adam=true", "trainer.precision=bf16"]),
        tmp_path)
    conv = next(p for p in run.net.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert run.optimizer.defaults["fused"] and run.speed.amp_dtype == torch.bfloat16
    cpu = torch.device("cpu")
    assert training.resolve_precision("auto", cpu) == "fp32"
    # bf16 for large networks on a CPU that multiplies bf16 natively: AMX tiles or AVX-512
    # BF16 (an AMD EPYC has the second and not the first); neither: fp32.
    for amx, avx512_bf16 in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                            raising=False)
        native = amx or avx512_bf16
        assert training.resolve_precision("auto", cpu, 0.9 * training.speed.CPU_BF16_FLOPS) == "fp32"
        assert training.resolve_precision("auto", cpu, training.speed.CPU_BF16_FLOPS) == (
            "bf16" if native else "fp32")
    with pytest.raises(ConfigError, match="trainer.precision must be one of"):
        training.resolve_precision("fp8", cpu)
    with pytest.raises(ConfigError, match="tf32 is a CUDA matmul mode"):
        training.resolve_precision("tf32", cpu)


@pytest.mark.parametrize("log_every, found", [(10, 30), (1000, 40)])
def test_deferred_check_stops_a_nan_run_keeping_the_last_good_checkpoint(
        tmp_path, monkeypatch, log_every, found):
    # Checkpoints at 20 and 40; step 26 is poisoned. The check reads the device at the next
    # log (step 30) or, if logs are rarer, before the next checkpoint (step 40): either way
    # the error names step 26 and its sigma, and last.pt stays the step-20 one.
    real = training.train_step

    def poisoned(run, x, *shard):
        if run.step == 25:
            x = x.clone()
            x[0, 0] = math.nan
        return real(run, x, *shard)
    monkeypatch.setattr(training.loop, "train_step", poisoned)
    cfg = compose_train(TINY + [f"trainer.log_every={log_every}"])
    with pytest.raises(training.NonFiniteLossError,
                       match=rf"loss became nan at step 26 at sigma \d.*found at step {found}"):
        training.train(cfg, tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 20
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last.pt", "step_00000020.pt"]


def test_an_infinite_gradient_is_caught_too(tmp_path):
    run = training.build_run(compose_train(TINY), tmp_path)
    x = next(infinite_batches(run.data.train, 64, run.data_generator))
    training.train_step(run, x)
    training.check_finite(run)                                      # a good step passes
    # A loss of 1 whose gradient, 3e38 for one weight, has a norm beyond float32's range.
    weight = next(run.net.parameters()).flatten()[0]
    run.objective = lambda net, x: ((weight - weight.detach()) * 3e38 + torch.ones(len(x)),
                                    None)
    training.train_step(run, x)
    with pytest.raises(training.NonFiniteLossError, match="gradient norm became inf at step 2"):
        training.check_finite(run)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_step_never_waits_for_the_device(tmp_path):
    run = training.build_run(compose_train(IMAGES[:-1] + ["trainer.device=cuda"]), tmp_path)
    batches = training_batches(run.data, 16, run.data_generator, run.device)
    xs = [next(batches) for _ in range(4)]
    training.train_step(run, xs[0])                                 # warm-up allocations
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs[1:]:
            training.train_step(run, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- data on the device
@pytest.mark.parametrize("name, write, batch, extra", [
    ("cifar10", write_cifar10, 6, {"random_flip": True, "uniform_dequantization": True,
                                   "rescaled": True}),
    ("cifar10", write_cifar10, 6, {"random_flip": True, "gaussian_dequantization": True,
                                   "logit_transform": True}),
    ("svhn", write_svhn, 3, {}),
    ("mnist", lambda root: write_mnist(root, "MNIST"), 3, {"uniform_dequantization": True}),
    ("digits", None, 64, {"random_flip": True, "uniform_dequantization": True}),
])
def test_device_batches_are_the_loader_batches(tmp_path, skip_md5, name, write, batch,  # noqa: F811
                                               extra):
    if write is not None:
        write(tmp_path)
    data = build_image_data(config(name, tmp_path, **extra))
    assert data.raw_train is not None and data.raw_train.pixels.dtype == torch.uint8
    drawn = {}
    for on_device in (False, True):
        torch.manual_seed(1)
        batches = training_batches(data, batch, torch.Generator().manual_seed(3), "cpu",
                                   on_device=on_device)
        drawn[on_device] = []
        for _ in range(3 * len(data.train) // batch + 1):             # over several epochs
            drawn[on_device].append(next(batches))
            torch.randn(7)                               # training draws in between, as a step
    for loader_batch, device_batch in zip(drawn[False], drawn[True]):
        assert torch.equal(loader_batch, device_batch)


def test_resized_and_large_datasets_stay_on_the_loader(tmp_path, skip_md5):  # noqa: F811
    write_cifar10(tmp_path)
    assert build_image_data(config("cifar10", tmp_path, image_size=16)).raw_train is None
    with pytest.raises(ValueError, match="batch_size=64 is larger than the training split"):
        training_batches(build_image_data(config("cifar10", tmp_path)), 64,
                         torch.Generator(), "cpu")


# ----------------------------------------------------------------------------- threads, EMA, NFE
def test_num_threads_auto_counts_the_steps_flops(tmp_path, monkeypatch):
    # model=mlp: Linear(2, h), Linear(h, h), Linear(h, 2); a Linear(a, b) costs 2ab FLOPs per
    # sample, a step three forward passes of the batch.
    h, batch = 32, 64
    tiny = [o for o in TINY if not o.startswith("sampler.")]
    cfg = compose_train(tiny + ["model=mlp", "loss=ssm", "sampler=langevin",
                                f"model.hidden={h}", "model.n_layers=2",
                                "trainer.num_threads=auto"])
    run = training.build_run(cfg, tmp_path)
    assert training.step_flops(run) == 3 * batch * 2 * (2 * h + h * h + h * 2)
    assert torch.get_num_threads() == 1
    # A large step: the cores the other processes leave free, within [1, torch's default].
    monkeypatch.setattr(training.speed, "ONE_THREAD_FLOPS", 1.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    monkeypatch.setattr(training.speed.os, "cpu_count", lambda: 8)
    for load, threads in ((0.0, 7), (4.8, 3), (20.0, 1)):
        monkeypatch.setattr(training.speed.os, "getloadavg", lambda: (load, load, load))
        assert training.auto_num_threads(run) == threads


def test_fused_ema_is_torchs_ema_to_the_bit(tmp_path):
    run = training.build_run(compose_train(TINY + ["trainer.ema_rate=0.9"]), tmp_path)
    reference = AveragedModel(run.net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    reference.update_parameters(run.net)
    batches = infinite_batches(run.data.train, 64, run.data_generator)
    for _ in range(4):
        training.train_step(run, next(batches))
        reference.update_parameters(run.net)
    for key, value in reference.module.state_dict().items():
        assert torch.equal(run.ema.module.state_dict()[key], value), key


def test_fp16_resume_keeps_the_gradient_scale(tmp_path):
    fp16 = ["trainer.precision=fp16", "trainer.n_steps=40"]
    straight = training.train(compose_train(TINY + fp16), tmp_path / "a")
    training.train(compose_train(TINY + ["trainer.precision=fp16", "trainer.n_steps=20"]),
                   tmp_path / "b")
    resumed = training.train(compose_train(TINY + fp16 + ["trainer.resume=true"]),
                             tmp_path / "b")
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert isinstance(a["scaler"]["scale"], float) and a["scaler"] == b["scaler"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_picture_sampling_logs_the_evaluations_it_then_makes(tmp_path, caplog, monkeypatch):
    run = training.build_run(compose_train(TINY + ["trainer.n_plot_samples=16"]), tmp_path)
    calls = []
    run.ema.module.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    with caplog.at_level(logging.INFO, logger="ncsn.training"):
        training.log_sampling_cost(run, 16)
    timed = len(calls)
    training.draw_samples(run, 16)
    message = next(m for m in (r.getMessage() for r in caplog.records)
                   if "network evaluations" in m)
    assert f"{len(calls) - timed} network evaluations of a batch of 16" in message
    assert calls[timed:] == [16] * (len(calls) - timed)
    assert len(calls) - timed == 10 * 5 + 1                         # L T + the denoising step
