"""Sampling and evaluation over ranks, and per-sample seeds.

Sample i of seed S is drawn from its own generator (EDM's ``--seeds``), so one process, two
ranks (gloo on the CPU, torchrun or spawned in-process) and two batch sizes give the same
samples; with the same batch size the files written are byte for byte the same.
"""
import json
import logging
import os
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ncsn import distributed, sampling
from ncsn import evaluate as ev
from ncsn import training
from ncsn.checkpoint import load_checkpoint
from ncsn.config import config_dir
from ncsn.eval_config import register_eval_configs
from ncsn.generate import load_sampler, sampler_config
from ncsn.metrics import fid_inception_v3
from ncsn.outputs import write_samples
from ncsn.registry import ConfigError
from conftest import TINY, compose_train, spawn_ranks
from test_distributed import free_port

register_eval_configs()
WORKER_TIMEOUT = 180
# DDP training that draws its pictures at step 3 and at the end, between its collectives
TRAINED = TINY + ["trainer.n_steps=6", "trainer.ckpt_every=3", "trainer.batch_size=32",
                  "trainer.sample_every=3", "trainer.n_plot_samples=6"]
RANDOM = "eval.inception_random_init=true"


def compose_config(name, overrides):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    return training.train(compose_train(TINY + ["trainer.progress=false"]),
                          tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    cfg = compose_train(["experiment=digits", "model.ch=8", "noise.num_scales=4",
                         "trainer.n_steps=2", "trainer.n_plot_samples=0", "trainer.batch_size=8",
                         "trainer.device=cpu", "trainer.progress=false", "sampler.n_steps_each=2"])
    return training.train(cfg, tmp_path_factory.mktemp("digits"))


# ----------------------------------------------------------------------------- per-sample noise
@pytest.mark.parametrize("shape", [(2,), (1, 8, 8), (3, 40, 40)])
def test_a_samples_stream_depends_on_its_seed_and_index_only(shape):
    steps = sampling.steps_ahead(int(np.prod(shape))) + 3      # past the first draw-ahead
    whole, part = sampling.SampleNoise(7, range(5)), sampling.SampleNoise(7, range(2, 4))
    assert torch.equal(whole.initial((5, *shape))[2:4], part.initial((2, *shape)))
    for _ in range(steps):
        assert torch.equal(whole.randn_like(torch.zeros(5, *shape))[2:4],
                           part.randn_like(torch.zeros(2, *shape)))
    assert not torch.equal(sampling.SampleNoise(8, range(2, 4)).initial((2, *shape)),
                           sampling.SampleNoise(7, range(2, 4)).initial((2, *shape)))


def test_sample_seeds_are_distinct_within_a_run_even_in_32_bits():
    for seed in (0, 1, 2 ** 40):
        assert len({sampling.sample_seed(seed, i) % 2 ** 32 for i in range(5000)}) == 5000


def test_outside_per_sample_noise_the_samplers_draw_from_torchs_generator():
    x = torch.zeros(4, 3)
    torch.manual_seed(0)
    ours = sampling.randn_like(x)
    torch.manual_seed(0)
    assert torch.equal(ours, torch.randn_like(x))
    with sampling.per_sample_noise(0, range(4)):
        with pytest.raises(ValueError, match="3 samples from the generators of 4"):
            sampling.randn_like(torch.zeros(3, 3))


@pytest.mark.parametrize("init", ["uniform", "gaussian"])
def test_two_batch_sizes_give_the_same_samples(toy_ckpt, init):
    ckpt = load_checkpoint(toy_ckpt)
    cfg = sampler_config(ckpt["config"]["sampler"], {"init": init})
    sampler = load_sampler(ckpt, cfg, device="cpu")
    whole = torch.cat(list(sampler.batches(10, 10, seed=3)))
    in_threes = torch.cat(list(sampler.batches(10, 3, seed=3)))
    torch.testing.assert_close(in_threes, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sampler.draw(range(4, 7), seed=3), whole[4:7], rtol=1e-5,
                               atol=1e-6)
    assert not torch.allclose(torch.cat(list(sampler.batches(10, 10, seed=4))), whole)


# ----------------------------------------------------------------------------- two ranks, spawned
def _worker(rank, world, port, toy_ckpt, out_dir):
    """One gloo rank: sample points, draw the training pictures, fit them to a short timeout
    and meet the refusals; its results go to a file."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_distributed()
    results = {}
    cfg = compose_config("sample", [f"ckpt={toy_ckpt}", "n_samples=7", "batch_size=2",
                                    "device=cpu"])
    write_samples(load_checkpoint(toy_ckpt), None, cfg, out_dir / "points")
    training.train(compose_train(TRAINED), out_dir / "trained")
    run = training.build_run(compose_train(TINY), out_dir / "run")
    results["pictures"] = training.draw_shared(run, 7, return_trajectory=True)
    results["fitted"] = _fitted_to_a_short_timeout(run)
    for name, call in _refusals(toy_ckpt, out_dir).items():
        try:
            call()
            results[name] = "ran"
        except ConfigError as err:
            results[name] = str(err)
    torch.save(results, out_dir / f"rank{rank}.pt")


def _fitted_to_a_short_timeout(run):
    """With a timeout of 2 s and a network whose evaluation costs time in proportion to
    its batch, 8 picture samples (4 a rank) would take 2 s a rank, twice the 1 s allowed:
    4 fit."""
    nfe = training.network_evaluations(run.cfg.sampler, len(run.sigmas))
    distributed.TIMEOUT = timedelta(seconds=2)
    training.sampling_cost.seconds_per_evaluation = lambda run, n: n * 0.5 / nfe
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("ncsn.training").addHandler(handler)
    return training.samples_within_timeout(run, 8), logged


def _refusals(toy_ckpt, out_dir):
    ckpt = load_checkpoint(toy_ckpt)
    inpaint = compose_config("sample", [f"ckpt={toy_ckpt}", "mode=inpaint"])
    samples = compose_config("eval", [f"samples={out_dir / 'points' / 'samples.npz'}",
                                      "metric=[swd]", "dataset=swiss_roll"])
    stats = compose_config("eval", ["mode=stats", "dataset=digits", RANDOM])
    return {"inpaint": lambda: write_samples(ckpt, None, inpaint, out_dir / "inpaint"),
            "samples": lambda: ev.run(samples, out_dir / "eval"),
            "stats": lambda: ev.run(stats, out_dir / "stats")}


@pytest.fixture(scope="module")
def two_ranks(toy_ckpt, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    spawn_ranks(_worker, (2, free_port(), toy_ckpt, out_dir), WORKER_TIMEOUT)
    return out_dir, [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def test_two_ranks_write_the_samples_one_process_writes(two_ranks, toy_ckpt, tmp_path):
    out_dir, _ = two_ranks
    cfg = compose_config("sample", [f"ckpt={toy_ckpt}", "n_samples=7", "batch_size=2",
                                    "device=cpu"])
    write_samples(load_checkpoint(toy_ckpt), None, cfg, tmp_path)
    assert (tmp_path / "samples.npz").read_bytes() == \
        (out_dir / "points" / "samples.npz").read_bytes()


def test_the_training_pictures_are_split_over_the_ranks(two_ranks, tmp_path):
    _, (rank0, rank1) = two_ranks
    assert distributed.rank_share(7) == range(7)
    run = training.build_run(compose_train(TINY), tmp_path)
    samples, trajectory = training.draw_samples(run, 7, return_trajectory=True)
    gathered, gathered_trajectory = rank0["pictures"]
    assert rank1["pictures"] is None and gathered.shape == samples.shape
    # ranks of 4 and 3 samples against one batch of 7: equal up to float round-off
    torch.testing.assert_close(gathered, samples, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered_trajectory, trajectory, rtol=1e-5, atol=1e-6)


def test_ddp_training_draws_its_pictures_over_both_ranks(two_ranks, tmp_path):
    out_dir, _ = two_ranks
    one = training.train(compose_train(TRAINED), tmp_path)
    pictures = sorted(p.name for p in (out_dir / "trained" / "pictures").iterdir())
    assert pictures == sorted(p.name for p in (one.parent.parent / "pictures").iterdir())
    assert "samples.png" in pictures and "trajectories.png" in pictures


def test_picture_samples_that_would_pass_half_the_timeout_are_shrunk(two_ranks):
    _, ranks = two_ranks
    (fitted, logged), (fitted_1, _) = ranks[0]["fitted"], ranks[1]["fitted"]
    assert fitted == fitted_1 == 4
    assert any("drawing 8 picture samples" in m and "drawing 4 instead" in m
               and "trainer.n_plot_samples" in m for m in logged), logged


@pytest.mark.parametrize("name, says", [("inpaint", "mode=inpaint runs in one process"),
                                        ("samples", "samples= is scored in one process"),
                                        ("stats", "stats sub-command runs in one process")])
def test_what_runs_in_one_process_is_refused_over_ranks(two_ranks, name, says):
    _, ranks = two_ranks
    for rank in ranks:
        assert says in rank[name] and "without torchrun" in rank[name]


# ----------------------------------------------------------------------------- torchrun
def torchrun(module, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", module, *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=240, env=env,
                          stdin=subprocess.DEVNULL)


def test_torchrun_sample_writes_one_processs_shards(digits_ckpt, tmp_path):
    args = [f"ckpt={digits_ckpt}", "n_samples=7", "device=cpu", "save_as=npz"]
    for batch_size in (2, 7):
        write_samples(load_checkpoint(digits_ckpt), None,
                      compose_config("sample", args + [f"batch_size={batch_size}"]),
                      tmp_path / f"one_{batch_size}")
    done = torchrun("ncsn.cli.sample", *args, "batch_size=2",
                    f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted((tmp_path / "one_2" / "shards").iterdir())
    assert [p.name for p in shards] == sorted(os.listdir(tmp_path / "two" / "shards"))
    for shard in shards:
        assert shard.read_bytes() == (tmp_path / "two" / "shards" / shard.name).read_bytes()
    pixels = lambda d: np.concatenate([np.load(p)["samples"]                  # noqa: E731
                                       for p in sorted((tmp_path / d / "shards").iterdir())])
    assert np.abs(pixels("one_2").astype(int) - pixels("one_7")).max() <= 1   # 8-bit rounding


def test_torchrun_eval_scores_what_one_process_scores(digits_ckpt, tmp_path):
    options = ev.EvalOptions(inception_random_init=True)
    reference = ev.reference_from_batches([torch.rand(3, 1, 8, 8)],
                                          fid_inception_v3(random_init=True), options, "noise")
    ev.save_reference(tmp_path / "ref.npz", reference)
    args = [f"ckpt={digits_ckpt}", "metric=[fid,is,kid]", RANDOM, "eval.is_splits=2",
            "eval.kid_subsets=2", "eval.kid_subset_size=3", "n_samples=4", "batch_size=2",
            f"ref_stats={tmp_path / 'ref.npz'}", "device=cpu"]
    one = ev.run(compose_config("eval", args), tmp_path / "one")
    done = torchrun("ncsn.cli.eval", *args, f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["n_samples"] == one["n_samples"] == 4
    for key in ("fid", "is", "kid"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6, abs=1e-9)
