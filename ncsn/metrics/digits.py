"""A measuring instrument for scikit-learn's 8x8 digits: a small CNN and metrics built on it.

The Inception network means nothing on 8x8 grey digits, so samples of the quick-start
dataset are judged by a classifier trained on the real digits (the role Inception plays for
ImageNet-like images): a Frechet distance in its penultimate feature space, its confidence,
and the histogram of predicted classes (a mode-dropping model shows empty bins).

Split: ``sklearn.datasets.load_digits`` rows in their shipped order, the first 80%
(1437 images) for training and the last 20% (360 images) held out. Images are (1, 8, 8)
in [0, 1] (pixel values / 16).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from ncsn.metrics.frechet import FeatureStats, frechet_distance

TRAIN_FRACTION = 0.8


def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train (1437, 1, 8, 8), y_train (1437,), x_heldout (360, 1, 8, 8), y_heldout (360,))."""
    data = load_digits()
    x = torch.from_numpy(data.images / 16.0).float().unsqueeze(1)
    y = torch.from_numpy(data.target).long()
    n_train = int(TRAIN_FRACTION * len(x))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class DigitsClassifier(nn.Module):
    """Two 3x3 convolutions, a max pool, a ``feature_dim`` hidden layer, 10 logits."""

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 64, 4, 4)
            nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        """Images (B, 1, 8, 8) in [0, 1] -> penultimate features (B, feature_dim)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 1, 8, 8) -> logits (B, 10)."""
        return self.head(self.features(x))


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Translate each image by up to one pixel (zero fill): the only augmentation."""
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


@torch.enable_grad()      # callers may run under no_grad (digits_metrics does)
def train_digits_classifier(seed: int = 0, epochs: int = 15, batch_size: int = 64,
                            lr: float = 3e-3) -> DigitsClassifier:
    """Train the classifier on the first 80% of the digits; ~3 CPU-seconds.

    Adam with a one-cycle learning-rate schedule (Smith & Topin 2019) and one-pixel shifts;
    about 98% held-out accuracy. Runs on one thread, so it is deterministic for a seed.
    Returned in eval mode.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # 8x8 batches: more threads only add synchronisation
    try:
        return _train(seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, epochs: int, batch_size: int, lr: float) -> DigitsClassifier:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y, _, _ = digits_split()
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def default_classifier_path(seed: int = 0) -> Path:
    """``$XDG_CACHE_HOME`` (default ~/.cache) / ncsn / digits_classifier[_seedN].pt."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ncsn" / ("digits_classifier.pt" if seed == 0 else
                             f"digits_classifier_seed{seed}.pt")


def load_digits_classifier(path: str | os.PathLike | None = None,
                           seed: int = 0) -> DigitsClassifier:
    """The cached classifier at ``path`` (default ``default_classifier_path(seed)``).

    If the file is missing, or holds weights of another architecture, the classifier is
    trained with ``seed`` and saved there as a plain state dict.
    """
    path = Path(path).expanduser() if path is not None else default_classifier_path(seed)
    model = DigitsClassifier()
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except RuntimeError:
            pass                                                    # stale cache: retrain
    model = train_digits_classifier(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)                                           # atomic for parallel runs
    return model


@torch.no_grad()
def heldout_accuracy(classifier: DigitsClassifier) -> float:
    """Accuracy on the 360 held-out digits."""
    _, _, x, y = digits_split()
    return (classifier.eval()(x).argmax(1) == y).float().mean().item()


def _as_digit_images(samples: Tensor) -> Tensor:
    """(N, 64), (N, 8, 8) or (N, 1, 8, 8) in [0, 1] -> float (N, 1, 8, 8), range checked."""
    x = samples.detach().float().cpu().reshape(-1, 1, 8, 8)
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"expected digits in [0, 1] (pixel value / 16), got [{lo:.3g}, {hi:.3g}]")
    return x.clamp(0, 1)


@torch.no_grad()
def digits_metrics(samples: Tensor, classifier: DigitsClassifier | None = None,
                   path: str | os.PathLike | None = None) -> dict:
    """Judge digit samples (N, 1, 8, 8) (or (N, 64)) in [0, 1] with the digits classifier.

    Returns a dict:
        fid         Frechet distance between Gaussians fitted to the classifier's
                    penultimate features of the samples and of the 360 held-out digits
                    (the FID recipe of Heusel et al. 2017 in this feature space);
        confidence  mean over samples of the largest softmax probability;
        histogram   list of 10 ints, how many samples are classified as each digit.
    ``classifier`` defaults to ``load_digits_classifier(path)``.
    """
    classifier = (classifier or load_digits_classifier(path)).eval()
    x = _as_digit_images(samples)
    _, _, x_ref, _ = digits_split()
    feats, ref = classifier.features(x), classifier.features(x_ref)
    s, r = FeatureStats().update(feats), FeatureStats().update(ref)
    probs = classifier.head(feats).softmax(1)                       # (N, 10)
    return {
        "fid": frechet_distance(s.mu, s.sigma, r.mu, r.sigma),
        "confidence": probs.max(1).values.mean().item(),
        "histogram": torch.bincount(probs.argmax(1), minlength=10).tolist(),
    }
