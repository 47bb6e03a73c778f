"""Tests of ncsn.metrics: every expected number comes from a closed form or a brute-force
reference, never from a previous run."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from torch import nn
from torchvision.models.inception import Inception3, InceptionA

from ncsn import evaluate as ev
from ncsn.data.toy import GaussianMixture
from ncsn.metrics import (FeatureStats, InceptionWeightsNotFound, digits_metrics,
                          energy_distance, extract_features, fid_inception_v3,
                          frechet_distance, heldout_accuracy, inception_score, kid,
                          load_digits_classifier, load_stats, save_stats, score_error,
                          sliced_wasserstein)
from ncsn.metrics.digits import digits_split
from ncsn.metrics.inception import WEIGHTS_FILE, WEIGHTS_URL, FIDInceptionA
from ncsn.metrics.scores import mmd2_unbiased


def _random_cov(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


# ---------------------------------------------------------------- Frechet distance

def _frechet_scipy(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (3, 20, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            _frechet_scipy(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_diagonal_closed_form():
    # commuting covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rank", [None, 10])                       # full and singular
def test_frechet_identical_stats_is_zero(rank):
    rng = np.random.default_rng(1)
    mu, s = rng.standard_normal(50) * 10, _random_cov(rng, 50, rank) * 100
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    assert abs(frechet_distance(torch.tensor(mu), torch.tensor(s), mu, s)) < 1e-9 * np.trace(s)


def test_feature_stats_streaming_matches_numpy():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((301, 7)) * [1, 2, 3, 4, 5, 6, 7] + 1e4     # large offset
    stats = FeatureStats()
    for part in np.split(feats, [1, 50, 51, 200]):                            # uneven, size 1
        stats.update(torch.from_numpy(part))
    assert stats.n == 301
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-8)


def test_stats_npz_round_trip_published_format(tmp_path):
    rng = np.random.default_rng(3)
    stats = FeatureStats().update(torch.from_numpy(rng.standard_normal((40, 6))))
    stats.save(tmp_path / "ours.npz")
    with np.load(tmp_path / "ours.npz") as f:
        assert sorted(f.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(f["mu"], stats.mu)
    # a file as TTUR / pytorch-fid publish them: np.savez with float32 mu and sigma
    mu, sigma = rng.standard_normal(6).astype(np.float32), _random_cov(rng, 6).astype(np.float32)
    np.savez(tmp_path / "published.npz", mu=mu, sigma=sigma)
    mu_l, sigma_l = load_stats(tmp_path / "published.npz")
    assert mu_l.dtype == np.float64 and sigma_l.shape == (6, 6)
    np.testing.assert_array_equal(mu_l, mu.astype(np.float64))
    save_stats(tmp_path / "again.npz", mu_l, sigma_l)
    np.testing.assert_array_equal(load_stats(tmp_path / "again.npz")[1], sigma_l)
    np.savez(tmp_path / "wrong.npz", mean=mu)
    with pytest.raises(KeyError, match="mu"):
        load_stats(tmp_path / "wrong.npz")


# ---------------------------------------------------------------- IS and KID

def test_inception_score_uniform_is_one():
    probs = torch.full((100, 1008), 1 / 1008)
    assert inception_score(probs) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert inception_score(torch.zeros(100, 10)) == pytest.approx((1.0, 0.0), abs=1e-9)


def test_inception_score_even_one_hot_is_k():
    k, splits = 7, 10
    labels = torch.arange(splits * k * 3) % k                      # every split holds each class
    one_hot = nn.functional.one_hot(labels, k).double()
    assert inception_score(one_hot, splits=splits) == pytest.approx((k, 0.0), abs=1e-9)


def test_inception_score_cuts_its_splits_where_openais_code_does():
    # N = 205 rows in 10 splits: OpenAI's improved-GAN code (and torch-fidelity) take rows
    # [i*205//10, (i+1)*205//10) = 0:20, 20:41, 41:61, 61:82, ..., so the 21-row parts fall
    # at i = 1, 3, 5, 7, 9; tensor_split would give the first five parts 21 rows instead.
    n, splits = 205, 10
    logits = torch.randn(n, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    bounds = [(0, 20), (20, 41), (41, 61), (61, 82), (82, 102), (102, 123), (123, 143),
              (143, 164), (164, 184), (184, 205)]
    scores = []
    for start, end in bounds:
        p = logits[start:end].softmax(1).numpy()
        py = p.mean(0, keepdims=True)
        scores.append(np.exp((p * (np.log(p) - np.log(py))).sum(1).mean()))
    assert inception_score(logits, splits=splits) == pytest.approx(
        (np.mean(scores), np.std(scores)), rel=1e-12)
    stream = ev.InceptionScoreStream(n, splits=splits)
    for chunk in logits.split(16):
        stream.update(chunk)
    assert stream.result() == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)


def test_inception_score_logits_equal_probs():
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 3
    a, b = inception_score(logits), inception_score(logits.softmax(1))
    assert a == pytest.approx(b, rel=1e-6)
    assert 1 < a[0] < 10


def test_mmd2_unbiased_matches_double_loop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g).double(), torch.randn(5, 3, generator=g).double()
    k = lambda a, b: (a @ b / 3 + 1) ** 3                              # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert mmd2_unbiased(x, y) == pytest.approx(float(xx + yy - 2 * xy), rel=1e-10)


def test_kid_zero_for_same_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1500, 32, generator=g), torch.randn(1500, 32, generator=g)
    values = [kid(x, y + shift, subsets=20, subset_size=500) for shift in (0.0, 0.2, 0.5)]
    (same, same_std), (small, _), (large, _) = values
    assert abs(same) < 3 * same_std + 1e-4
    assert same < small < large and small > 5 * same_std


# ---------------------------------------------------------------- Inception network

def test_inception_keys_match_published_layout():
    """The published file is a state dict of torchvision's Inception3(num_classes=1008,
    aux_logits=False) with the FID blocks swapped in: same names and shapes."""
    ours = fid_inception_v3(random_init=True).state_dict()
    reference = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    assert ours["fc.weight"].shape == (1008, 2048)
    assert "Conv2d_1a_3x3.conv.weight" in ours and "Mixed_5b.branch_pool.conv.weight" in ours


def test_inception_loads_state_dict_file(tmp_path, monkeypatch):
    source = fid_inception_v3(random_init=True, seed=3).state_dict()
    # like the published conversion: plain tensors, no num_batches_tracked buffers
    plain = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    (tmp_path / "checkpoints").mkdir()
    torch.save(plain, tmp_path / "checkpoints" / WEIGHTS_FILE)
    loaded = fid_inception_v3(weights=tmp_path / "checkpoints" / WEIGHTS_FILE)
    assert torch.equal(loaded.state_dict()["Mixed_7c.branch_pool.conv.weight"],
                       source["Mixed_7c.branch_pool.conv.weight"])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert torch.equal(fid_inception_v3().fc.weight, source["fc.weight"])   # from the hub cache


def test_missing_weights_message_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    for kwargs in ({}, {"weights": tmp_path / "nowhere.pth"}):
        with pytest.raises(InceptionWeightsNotFound) as info:
            fid_inception_v3(**kwargs)
        message = str(info.value)
        assert isinstance(info.value, FileNotFoundError) and "\n" not in message
        assert WEIGHTS_FILE in message and WEIGHTS_URL in message
        assert str(tmp_path / "checkpoints") in message and "inception_weights" in message


def test_fid_block_pool_ignores_padding():
    """TF's SAME average pool divides by the number of real pixels: on a constant input
    the FID block equals torchvision's in the interior and differs only on the border."""
    torch.manual_seed(0)
    tv, fid = InceptionA(8, pool_features=4).eval(), FIDInceptionA(8, pool_features=4).eval()
    fid.load_state_dict(tv.state_dict())
    x = torch.ones(1, 8, 6, 6)
    with torch.no_grad():
        a, b = tv(x)[:, -4:], fid(x)[:, -4:]                       # the pool branch
    assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1])
    assert not torch.allclose(a[..., 0, :], b[..., 0, :])


@pytest.fixture(scope="module")
def inception_run():
    """64 random 32x32 images through the random-init network, in batches of 16."""
    model = fid_inception_v3(random_init=True)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 32, 32, generator=g)
    batches = ((images[i:i + 16], torch.zeros(16)) for i in range(0, 64, 16))   # loader-like
    return extract_features(model, batches, keep_features=True, keep_logits=True)


def test_fid_pipeline_end_to_end(inception_run):
    out = inception_run
    assert out.stats.n == 64 and out.features.shape == (64, 2048) and out.logits.shape == (64, 1008)
    assert np.isfinite(out.stats.sigma).all()
    np.testing.assert_allclose(out.stats.mu, out.features.double().mean(0).numpy(), atol=1e-5)
    fid_self = frechet_distance(out.stats.mu, out.stats.sigma, out.stats.mu, out.stats.sigma)
    assert abs(fid_self) < 1e-8 * np.trace(out.stats.sigma)
    f = out.features[:, :256]                                      # two halves, cheaper in 256-d
    half1, half2 = FeatureStats().update(f[:32]), FeatureStats().update(f[32:])
    assert 0 < frechet_distance(half1.mu, half1.sigma, half2.mu, half2.sigma) < np.inf
    is_mean, is_std = inception_score(out.logits, splits=4)
    assert 1 <= is_mean <= 1008 and np.isfinite(is_std)
    kid_mean, kid_std = kid(out.features[:32], out.features[32:], subsets=5, subset_size=32)
    assert np.isfinite(kid_mean) and np.isfinite(kid_std)


class _Recorder(nn.Module):
    """A stand-in for the Inception network that records what it is fed."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return x.flatten(1)[:, :4], x.flatten(1)[:, :3]


def test_extract_features_inputs():
    rec = _Recorder()
    gray = torch.rand(5, 1, 4, 4)
    out = extract_features(rec, [gray, (torch.full((2, 3, 4, 4), 255, dtype=torch.uint8),)],
                           keep_logits=True, device="cpu")
    assert rec.seen[0].shape == (5, 3, 4, 4) and torch.equal(rec.seen[0][:, 2], gray[:, 0])
    assert torch.equal(rec.seen[1], torch.ones(2, 3, 4, 4))
    assert out.stats.n == 7 and out.logits.shape == (7, 3) and out.features is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extract_features(rec, [gray * 2 - 1], device="cpu")


# ---------------------------------------------------------------- digits classifier

@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "digits_classifier.pt"
    model = load_digits_classifier(path)
    return model, path


def test_digits_classifier_is_accurate_and_cached(digits_classifier):
    model, path = digits_classifier
    assert heldout_accuracy(model) >= 0.95
    state = torch.load(path, weights_only=True)                    # a plain state dict
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = load_digits_classifier(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))


def test_digits_metrics(digits_classifier):
    model, _ = digits_classifier
    x_train, _, x_test, y_test = digits_split()
    real = digits_metrics(x_test, model)
    assert abs(real["fid"]) < 1e-6 and real["confidence"] > 0.9
    assert sum(real["histogram"]) == 360
    np.testing.assert_allclose(real["histogram"], np.bincount(y_test.numpy(), minlength=10), atol=5)
    train = digits_metrics(x_train.flatten(1), model)
    noise = digits_metrics(torch.rand(500, 64, generator=torch.Generator().manual_seed(0)), model)
    assert 0 < train["fid"] < noise["fid"] / 5 and sum(noise["histogram"]) == 500
    ones = digits_metrics(x_test[y_test == 1], model)              # a mode-collapsed "sampler"
    assert ones["histogram"][1] >= 0.9 * sum(ones["histogram"]) and ones["fid"] > train["fid"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        digits_metrics(x_test * 16, model)


# ---------------------------------------------------------------- toy distances

def test_sliced_wasserstein_is_exact_in_one_dimension():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, 1, generator=g), torch.randn(100, 1, generator=g) + 0.3
    sorted_diff = (a.sort(0).values - b.sort(0).values).abs().mean().item()
    assert sliced_wasserstein(a, b, n_projections=3) == pytest.approx(sorted_diff, rel=1e-6)
    c = torch.randn(37, 1, generator=g)                           # unequal sizes
    assert sliced_wasserstein(a, c, n_projections=3) == pytest.approx(
        scipy.stats.wasserstein_distance(a[:, 0].numpy(), c[:, 0].numpy()), rel=1e-6)


def test_energy_distance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=g).double(), torch.randn(23, 3, generator=g).double()
    d = lambda a, b: torch.cdist(a, b)                                # noqa: E731
    expected = 2 * d(x, y).mean() - d(x, x).sum() / (30 * 29) - d(y, y).sum() / (23 * 22)
    assert energy_distance(x, y, chunk=7) == pytest.approx(expected.item(), rel=1e-12)


def test_toy_distances_near_zero_and_monotone_in_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 2, generator=g), torch.randn(1800, 2, generator=g)
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
    sw = [sliced_wasserstein(x, y + s) for s in shifts]
    ed = [energy_distance(x, y + s) for s in shifts]
    assert sw[0] < 0.06 and abs(ed[0]) < 0.01
    assert all(a < b for a, b in zip(sw, sw[1:])) and all(a < b for a, b in zip(ed, ed[1:]))
    # W1 between translates in 1-D is the translation, so SW1 -> E|theta . s| = (2 / pi) |s|
    # in 2-D; y + 2 shifts by s = (2, 2)
    assert sw[-1] == pytest.approx(2 / np.pi * 2 * np.sqrt(2), rel=0.05)


class _ScaledScore(nn.Module):
    """c * (exact score): a network with a parameter, checking the call convention."""

    def __init__(self, mixture, c):
        super().__init__()
        self.mixture, self.c = mixture, nn.Parameter(torch.tensor(float(c)))

    def forward(self, x, sigma):
        assert sigma.shape == (x.shape[0],)
        return self.c * self.mixture.score(x, sigma)


def test_score_error():
    mixture = GaussianMixture.create([[-5.0, -5.0], [5.0, 5.0]], [0.2, 0.8])
    sigmas = [10.0, 1.0, 0.1]
    net = _ScaledScore(mixture, 1.0).train()
    exact = score_error(net, mixture, sigmas, n=500)
    assert net.training                                            # mode restored
    zero = score_error(lambda x, sigma: torch.zeros_like(x), mixture, sigmas, n=500)
    half = score_error(_ScaledScore(mixture, 0.5), mixture, sigmas, n=500)
    assert exact["sigma"] == sigmas and max(exact["mse"]) < 1e-10
    assert zero["relative"] == pytest.approx([1.0] * 3)               # ||0 - s||^2 / ||s||^2
    assert half["relative"] == pytest.approx([0.25] * 3, rel=1e-5)    # ||s/2 - s||^2 / ||s||^2
    # E||grad log q_sigma||^2 is about d / (1 + sigma^2) for unit-variance components
    assert zero["mse"][0] < zero["mse"][1] < zero["mse"][2]
