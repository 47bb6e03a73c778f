"""ncsn-eval and ncsn.evaluate: streaming scores, sample files, reference statistics, sweeps,
the digits and 2-D metrics, and the command's errors. The Inception network is randomly
initialised (nothing to download) and fed a few dozen tiny images: it runs at a few images
per second on a CPU, and its scores mean nothing -- the tests check the plumbing and the
mathematics, never a golden number."""
import csv
import json
import re

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from ncsn import evaluate as ev
from ncsn.checkpoint import load_checkpoint
from ncsn.config import config_dir
from ncsn.data.toy import make_toy
from ncsn.eval_config import eval_dir, register_eval_configs
from ncsn.metrics import fid_inception_v3, inception_score
from ncsn.metrics.digits import digits_split
from ncsn.metrics.inception import WEIGHTS_FILE, WEIGHTS_URL
from ncsn.registry import ConfigError
from ncsn.training import train
from conftest import TINY, compose_train, run_cli

register_eval_configs()
RANDOM = "eval.inception_random_init=true"
N_IMAGES = 10


def compose_eval(overrides=()):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def one_line_error(result, code=2):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    return lines[0]


# ----------------------------------------------------------------------------- streaming
def test_streamed_inception_score_equals_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(103, 17, generator=g) * 3                 # 103 = 10 uneven splits
    stream = ev.InceptionScoreStream(103, splits=10)
    for chunk in logits.split(7):
        stream.update(chunk)
    assert stream.result() == pytest.approx(inception_score(logits, splits=10), rel=1e-10)
    uniform = ev.InceptionScoreStream(20, splits=10)
    uniform.update(torch.zeros(20, 1008))
    assert uniform.result() == pytest.approx((1.0, 0.0), abs=1e-12)
    with pytest.raises(ConfigError, match="at least 10 samples"):
        ev.InceptionScoreStream(9, splits=10)


def test_reservoir_keeps_a_uniform_subset_of_the_stream():
    rows = torch.arange(20.0)[:, None]                              # (20, 1), values = ids
    all_kept = ev.Reservoir(50)
    all_kept.add(rows[:7])
    all_kept.add(rows[7:])
    assert torch.equal(all_kept.rows, rows)
    hits = torch.zeros(20)
    for seed in range(1500):
        r = ev.Reservoir(5, seed)
        for chunk in rows.split(6):
            r.add(chunk)
        ids = r.rows[:, 0].long()
        assert len(ids.unique()) == 5 and r.seen == 20
        hits[ids] += 1
    # every row is kept with probability k / n = 1/4 (binomial std ~ 0.011 over 1500 runs)
    assert (hits / 1500 - 0.25).abs().max() < 0.05


# ----------------------------------------------------------------------------- sample files
def test_sample_files_read_every_layout_in_batches(tmp_path):
    g = np.random.default_rng(0)
    pixels = g.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)    # (N, H, W, C) as ncsn-sample
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    (tmp_path / "run" / "shards").mkdir(parents=True)
    np.savez(tmp_path / "run" / "shards" / "samples_00000.npz", samples=pixels[:4])
    np.savez(tmp_path / "run" / "shards" / "samples_00001.npz", samples=pixels[4:])
    np.savez_compressed(tmp_path / "nchw.npz", samples=expected.numpy())
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "pngs" / f"{i:03d}.png")
    for source in ("run", "nchw.npz", "pngs"):
        files = ev.SampleFiles(tmp_path / source)
        assert len(files) == 10 and files.shape == (3, 6, 5) and files.kind == "images"
        batches = list(files.batches(3))
        if source == "run":                                         # batches within shards
            assert [len(b) for b in batches] == [3, 1, 3, 3]
        assert torch.allclose(torch.cat(batches), expected, atol=1e-6), source
    grey = g.random((7, 8, 8)).astype(np.float32)                  # (N, H, W)
    np.savez(tmp_path / "grey.npz", samples=grey)
    assert torch.equal(torch.cat(list(ev.SampleFiles(tmp_path / "grey.npz").batches(4))),
                       torch.from_numpy(grey)[:, None])
    np.savez(tmp_path / "points.npz", samples=g.standard_normal((9, 2)))
    points = ev.SampleFiles(tmp_path / "points.npz")
    assert points.kind == "points" and torch.cat(list(points.batches(4))).shape == (9, 2)


def test_sample_folders_read_every_extension_pytorch_fid_reads(tmp_path):
    # pytorch-fid's IMAGE_EXTENSIONS: bmp jpg jpeg pgm png ppm tif tiff webp. The lossless
    # ones must give back the written pixels exactly; greyscale .pgm reads as one channel.
    g = np.random.default_rng(3)
    rgb = g.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    lossless = {".bmp": {}, ".png": {}, ".ppm": {}, ".tif": {}, ".tiff": {},
                ".webp": {"lossless": True}}
    folder = tmp_path / "mixed"
    folder.mkdir()
    for n, (suffix, options) in enumerate(lossless.items()):
        for i, image in enumerate(rgb):
            Image.fromarray(image).save(folder / f"{n}{i}{suffix}", **options)
    Image.fromarray(rgb[0]).save(folder / "90.jpg", quality=100, subsampling=0)
    Image.fromarray(rgb[1]).save(folder / "91.jpeg", quality=100, subsampling=0)
    (folder / "notes.txt").write_text("not an image")
    files = ev.SampleFiles(folder)
    assert len(files) == 2 * len(lossless) + 2 and files.shape == (3, 6, 5)
    batch = torch.cat(list(files.batches(5)))
    expected = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(batch[:-2], expected.repeat(len(lossless), 1, 1, 1))
    assert (batch[-2:] - expected).abs().max() < 0.05                 # JPEG: nearly
    grey = g.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    (tmp_path / "grey").mkdir()
    for i, image in enumerate(grey):
        Image.fromarray(image).save(tmp_path / "grey" / f"{i}.pgm")
    pgm = ev.SampleFiles(tmp_path / "grey")
    assert pgm.shape == (1, 4, 4)
    assert torch.equal(torch.cat(list(pgm.batches(2))), torch.from_numpy(grey)[:, None] / 255)


def test_sample_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="samples not found"):
        ev.SampleFiles(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no samples in"):
        ev.SampleFiles(tmp_path)
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 3, 4, 4)))
    with pytest.raises(ConfigError, match="'samples'"):
        ev.SampleFiles(tmp_path / "other.npz")
    np.savez(tmp_path / "signed.npz", samples=np.full((2, 3, 4, 4), -1.0))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        list(ev.SampleFiles(tmp_path / "signed.npz").batches(2))


# ----------------------------------------------------------------------------- metric names
def test_metric_names_are_checked_against_the_data():
    assert ev.parse_metrics("auto", "images", "cifar10") == ["fid"]
    assert ev.parse_metrics("auto", "images", "digits") == ["digits"]
    assert ev.parse_metrics("auto", "points", "gaussian_mixture", has_net=True) == \
        ["swd", "energy", "score_error"]
    assert ev.parse_metrics(["fid", "is", "kid"], "images") == ["fid", "is", "kid"]
    assert ev.parse_metrics("fid,is", "images") == ["fid", "is"]
    with pytest.raises(ConfigError) as info:
        ev.parse_metrics(["fid", "fdi"], "images")
    message = str(info.value)
    assert "'fdi'" in message and all(m in message for m in ev.METRICS) and "\n" not in message
    with pytest.raises(ConfigError, match="points"):
        ev.parse_metrics("fid", "points")
    with pytest.raises(ConfigError, match="gaussian_mixture"):
        ev.parse_metrics("score_error", "points", "swiss_roll", has_net=True)


def test_default_output_folder_is_next_to_the_run():
    assert eval_dir("runs/a/checkpoints/last.pt", None, "T") == "runs/a/eval/T"
    assert eval_dir(None, "runs/a", "T") == "runs/a/eval/T"
    assert eval_dir(None, None, "T") == "eval/T"


# ----------------------------------------------------------------------------- FID / IS / KID
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Reference images as PNGs and the same pixels as ncsn-sample's shards; other random
    images as a float (N, C, H, W) .npz."""
    root = tmp_path_factory.mktemp("images")
    g = np.random.default_rng(0)
    pixels = g.integers(0, 256, (N_IMAGES, 16, 16, 3), dtype=np.uint8)
    (root / "pngs").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(root / "pngs" / f"{i:03d}.png")
    (root / "sampled" / "shards").mkdir(parents=True)
    np.savez(root / "sampled" / "shards" / "samples_00000.npz", samples=pixels[:5])
    np.savez(root / "sampled" / "shards" / "samples_00001.npz", samples=pixels[5:])
    np.savez(root / "random.npz", samples=g.random((N_IMAGES, 3, 16, 16)).astype(np.float32))
    return root


@pytest.fixture(scope="module")
def inception():
    return fid_inception_v3(random_init=True)


def test_reference_statistics_from_files_agree_and_round_trip(images, inception, tmp_path):
    options = ev.EvalOptions(inception_random_init=True, kid_max_features=8)
    from_pngs = ev.reference_from_batches(ev.SampleFiles(images / "pngs").batches(5),
                                          inception, options, "pngs")
    from_shards = ev.reference_from_batches(ev.SampleFiles(images / "sampled").batches(4),
                                            inception, options, "shards")
    # the same pixels read from PNGs and from shards, in other batch sizes: same statistics
    np.testing.assert_allclose(from_pngs.mu, from_shards.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_pngs.sigma, from_shards.sigma, rtol=1e-4, atol=1e-6)
    assert from_pngs.n == N_IMAGES and from_pngs.features.shape == (8, 2048)
    assert from_pngs.mu.shape == (2048,) and from_pngs.sigma.shape == (2048, 2048)

    path = ev.save_reference(tmp_path / "ref.npz", from_pngs)
    with np.load(path) as f:                                        # the published format
        assert {"mu", "sigma"} <= set(f.files) and f["mu"].dtype == np.float64
    loaded = ev.load_reference(path)
    np.testing.assert_array_equal(loaded.sigma, from_pngs.sigma)
    np.testing.assert_array_equal(loaded.features, from_pngs.features)
    assert loaded.n == N_IMAGES and "random init" in loaded.inception
    ev.check_reference(loaded, ["fid", "kid"], options)
    with pytest.raises(ConfigError, match="do not match"):
        ev.check_reference(loaded, ["fid"], ev.EvalOptions())

    np.savez(tmp_path / "published.npz", mu=from_pngs.mu.astype(np.float32),
             sigma=from_pngs.sigma.astype(np.float32))              # as TTUR publishes them
    published = ev.load_reference(tmp_path / "published.npz")
    assert published.features is None and published.mu.dtype == np.float64
    ev.check_reference(published, ["fid"], options)
    with pytest.raises(ConfigError, match="only mu and sigma"):
        ev.check_reference(published, ["kid"], options)
    with pytest.raises(FileNotFoundError, match="ncsn-eval stats"):
        ev.load_reference(tmp_path / "missing.npz")


def test_fid_is_kid_stream_through_the_library(images, inception):
    options = ev.EvalOptions(inception_random_init=True, is_splits=4, kid_subsets=5,
                             kid_subset_size=6)
    tools = ev.Instruments(options, torch.device("cpu"), inception)
    tools.reference = ev.reference_from_batches(
        ev.SampleFiles(images / "pngs").batches(6), inception, options, "pngs")
    # "samples" holding the reference's own pixels: a Frechet distance of zero
    files = ev.SampleFiles(images / "sampled")
    scores = ev.score_stream(files.batches(5), len(files), ["fid", "is", "kid"], tools)
    assert scores.n_samples == N_IMAGES
    assert abs(scores.values["fid"]) < 1e-6 * np.trace(tools.reference.sigma)
    assert scores.values["is"] >= 1 and np.isfinite(scores.values["is_std"])
    assert np.isfinite(scores.values["kid"]) and scores.values["kid_std"] >= 0
    assert any("meaningless" in note for note in scores.notes)
    assert any("biased upward" in note for note in scores.notes)
    table = ev.format_table(scores)
    assert "kid" in table and f"{N_IMAGES}" in table and "meaningless" in table


@pytest.fixture(scope="module")
def digits_stats(tmp_path_factory):
    """The stats sub-command (mode=stats) on 10 digits, into a fresh cache folder."""
    root = tmp_path_factory.mktemp("stats")
    cfg = compose_eval(["mode=stats", "dataset=digits", f"max_images={N_IMAGES}", RANDOM,
                        f"eval.stats_dir={root / 'cache'}"])
    return root, ev.run(cfg, root / "out")


def test_stats_subcommand_caches_the_published_format(digits_stats):
    root, result = digits_stats
    path = root / "cache" / f"digits_train_8_n{N_IMAGES}_random-init.npz"
    assert result["stats"] == str(path) and result["n"] == N_IMAGES
    with np.load(path) as f:
        assert {"mu", "sigma"} <= set(f.files) and f["sigma"].shape == (2048, 2048)
    assert ev.load_reference(path).features.shape == (N_IMAGES, 2048)


def test_cli_scores_fid_is_kid_with_the_cached_statistics(digits_stats, images, tmp_path,
                                                          monkeypatch):
    # one thread, as in conftest: on 2 cores torch's and OpenBLAS's threads contend, and the
    # 2048 x 2048 eigendecompositions of the FID slow down several-fold
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, _ = digits_stats
    cached = root / "cache" / f"digits_train_8_n{N_IMAGES}_random-init.npz"
    written = cached.stat().st_mtime_ns
    result = run_cli("ncsn-eval", f"samples={images / 'random.npz'}", "metric=[fid,is,kid]",
                     "dataset=digits", f"max_images={N_IMAGES}", f"eval.stats_dir={root / 'cache'}",
                     RANDOM, "eval.kid_subsets=5", "eval.kid_subset_size=6",
                     f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert cached.stat().st_mtime_ns == written                    # used, not recomputed
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["n_samples"] == N_IMAGES and set(report["metrics"]) == \
        {"fid", "is", "is_std", "kid", "kid_std"}
    assert report["metrics"]["fid"] > 0 and report["metrics"]["is"] >= 1
    assert "random init" in report["inception"]
    for text in ("fid", "biased upward", "50000", "meaningless", str(cached)):
        assert text in result.stdout, text
    assert any((tmp_path / "tb").iterdir())


def test_missing_weights_is_one_line_with_exit_status_2(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))     # an empty hub cache
    result = run_cli("ncsn-eval", "stats", "dataset=digits", f"hydra.run.dir={tmp_path / 'out'}")
    line = one_line_error(result)
    assert WEIGHTS_FILE in line and WEIGHTS_URL in line and "eval.inception_weights" in line
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in line


# ----------------------------------------------------------------------------- digits
def test_digits_metrics_of_files_and_of_an_image_checkpoint(tmp_path, inception):
    _, _, heldout, labels = digits_split()
    np.savez(tmp_path / "heldout.npz", samples=heldout.numpy())    # (360, 1, 8, 8) in [0, 1]
    options = ev.EvalOptions(digits_classifier=str(tmp_path / "classifier.pt"), is_splits=2)
    tools = ev.Instruments.build(["digits"], options)
    tools.inception = inception
    files = ev.SampleFiles(tmp_path / "heldout.npz")
    metrics = ev.parse_metrics("auto", files.kind, "digits")
    real = ev.score_stream(files.batches(100), len(files), metrics, tools)
    assert abs(real.values["digits_fid"]) < 1e-6 and real.values["digits_confidence"] > 0.9
    np.testing.assert_allclose(real.details["digits_histogram"],
                               np.bincount(labels.numpy(), minlength=10), atol=5)

    # a (barely trained) image checkpoint: samples stream from the sampler to both instruments
    train(compose_train(["dataset=digits", "trainer.n_steps=1", "trainer.batch_size=8",
                         "trainer.n_plot_samples=0", "trainer.device=cpu",
                         "noise.num_scales=3", "sampler.n_steps_each=1"]), tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    draw = ev.Draw(n_samples=10, batch_size=4, device="cpu")
    scores = ev.score_checkpoint(ckpt, ["digits", "is"], draw, tools)
    assert scores.n_samples == 10 and sum(scores.details["digits_histogram"]) == 10
    assert scores.values["digits_fid"] > real.values["digits_fid"] and scores.values["is"] >= 1
    assert scores.source["step"] == 1 and scores.source["dataset"] == "digits"


# ----------------------------------------------------------------------------- 2-D data
def test_point_metrics_vanish_for_fresh_data_and_grow_with_a_shift():
    reference = ev.toy_reference({"name": "moons", "n_samples": 100, "n_test": 10, "seed": 0,
                                  "noise": 0.05})
    tools = ev.Instruments(ev.EvalOptions(), torch.device("cpu"))
    same = make_toy("moons", 1500, seed=7, noise=0.05)
    results = [ev.score_stream((same + shift).split(400), 1500, ["swd", "energy"], tools,
                               reference) for shift in (0.0, 0.3, 1.0)]
    swd = [r.values["swd"] for r in results]
    energy = [r.values["energy"] for r in results]
    assert swd[0] < 0.05 and abs(energy[0]) < 0.01
    assert swd[0] < swd[1] < swd[2] and energy[0] < energy[1] < energy[2]
    with pytest.raises(ConfigError, match="dataset=NAME"):
        ev.score_stream([same], 1500, ["swd"], tools, None)


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """A tiny run on the Gaussian mixture with checkpoints at steps 20, 30 and 40."""
    run_dir = tmp_path_factory.mktemp("mixture")
    train(compose_train(TINY + ["dataset=gaussian_mixture", "trainer.ckpt_every=10"]), run_dir)
    return run_dir


def test_sweep_writes_csv_and_plot_and_names_the_best(mixture_run, tmp_path, capsys):
    cfg = compose_eval([f"run={mixture_run}", "metric=[swd,energy,score_error]",
                        "n_samples=200", "sampler.n_steps_each=2", "device=cpu",
                        "eval.score_error_points=100"])
    summary = ev.run(cfg, tmp_path, sampler_overrides={"n_steps_each": 2})
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [20, 30, 40]
    assert all(int(r["n_samples"]) == 200 for r in rows)
    swd = {int(r["step"]): float(r["swd"]) for r in rows}
    best = min(swd, key=swd.get)
    assert summary["best"]["step"] == best and summary["best"]["metric"] == "swd"
    assert f"step_{best:08d}.pt" in summary["best"]["ckpt"]
    assert (tmp_path / "sweep.png").stat().st_size > 5000
    assert json.loads((tmp_path / "metrics.json").read_text())["best"]["step"] == best
    assert "best checkpoint by swd" in capsys.readouterr().out
    per_sigma = summary["checkpoints"][0]["score_error"]
    assert len(per_sigma["sigma"]) == 10 and all(r > 0 for r in per_sigma["relative"])


def test_sampling_a_checkpoint_starts_with_its_nfe_and_time(mixture_run, caplog):
    caplog.set_level("INFO", logger="ncsn")
    ckpt = load_checkpoint(mixture_run / "checkpoints" / "last.pt")
    draw = ev.Draw(n_samples=250, batch_size=100, sampler_overrides={"n_steps_each": 2},
                   device="cpu")
    scores = ev.score_checkpoint(ckpt, ["swd"], draw, ev.Instruments(ev.EvalOptions(),
                                                                     torch.device("cpu")))
    nfe = scores.source["nfe"][0]                   # what the sampler counted as it ran
    lines = [r.getMessage() for r in caplog.records if "sampling 250 samples" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert f"NFE {nfe} per sample, {250 * nfe:,} in all" in lines[0]
    assert re.search(r"on a batch of 100 takes [\d.e+-]+ s here, so about [\d.]+ (s|min|h)",
                     lines[0])


def test_durations_read_as_a_person_writes_them():
    from ncsn.cost import duration

    assert [duration(s) for s in (0.52, 9.9, 115, 14 * 60, 3.2 * 3600)] == \
        ["0.52 s", "9.9 s", "115 s", "14 min", "3.2 h"]


def test_sweep_falls_back_to_last_and_fails_without_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(Exception, match="no checkpoints in"):
        ev.sweep_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    assert ev.sweep_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "last.pt"]
