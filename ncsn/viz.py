"""Pictures: score fields, samples over data and Langevin trajectories for 2-D runs, and
image grids. Figures are matplotlib figures (saved as PNG and sent to TensorBoard)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402


def _bounds(points: Tensor, margin: float = 0.15) -> tuple[float, float, float, float]:
    lo, hi = points.min(0).values, points.max(0).values
    pad = margin * (hi - lo)
    return float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])


@torch.no_grad()
def score_field_figure(net, data: Tensor, sigma: float, grid_size: int = 24,
                       n_data: int = 2000, device="cpu"):
    """Arrows of s(x, sigma) on a grid over the data (2-D), the data as dots beneath."""
    x0, x1, y0, y1 = _bounds(data)
    xs, ys = torch.linspace(x0, x1, grid_size), torch.linspace(y0, y1, grid_size)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    sigma_b = torch.full((len(grid),), sigma)
    score = net(grid.to(device), sigma_b.to(device)).cpu()
    # Arrow lengths are normalised by the largest so that all noise levels read alike.
    score = score / score.norm(dim=1).max().clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(*data[:n_data].T, s=2, alpha=0.3, color="tab:gray")
    ax.quiver(grid[:, 0], grid[:, 1], score[:, 0], score[:, 1], color="tab:blue", width=0.003)
    ax.set_title(f"learned score s(x, sigma={sigma:.3g})")
    ax.set_aspect("equal")
    return fig


@torch.no_grad()
def density_figure(log_prob, data: Tensor, samples: Tensor, grid_size: int = 200,
                   n: int = 2000, device="cpu"):
    """Three panels over the data's range: the data, the learned density exp(log_prob(x))
    as a heat map (``log_prob``: (N, 2) -> (N,), a flow's exact log-density), the samples."""
    x0, x1, y0, y1 = _bounds(data)
    xs, ys = torch.linspace(x0, x1, grid_size), torch.linspace(y0, y1, grid_size)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    density = log_prob(grid.to(device)).exp().cpu().reshape(grid_size, grid_size)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    axes[0].scatter(*data[:n].T, s=2, alpha=0.4, color="tab:gray")
    axes[0].set_title("data")
    axes[1].imshow(density.numpy(), origin="lower", extent=(x0, x1, y0, y1), cmap="magma")
    axes[1].set_title("learned density p(x)")
    axes[2].scatter(*samples[:n].T, s=2, alpha=0.6, color="tab:orange")
    axes[2].set_title("samples")
    for ax in axes:
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def samples_figure(samples: Tensor, data: Tensor, n: int = 2000):
    """Samples (orange) over the data (gray)."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(*data[:n].T, s=2, alpha=0.4, color="tab:gray", label="data")
    ax.scatter(*samples[:n].T, s=2, alpha=0.6, color="tab:orange", label="samples")
    x0, x1, y0, y1 = _bounds(data)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.legend(loc="upper right", markerscale=4)
    shown = min(n, len(samples))
    ax.set_title(f"{shown} of {len(samples)} samples over data" if shown < len(samples)
                 else f"{shown} samples over data")
    ax.set_aspect("equal")
    return fig


MAX_CHAINS = 12         # more paths than this tangle into an unreadable picture


def trajectories_figure(trajectory: Tensor, data: Tensor, n_chains: int = 8,
                        sampler: str = "sampler"):
    """Paths of the first ``n_chains`` chains (at most :data:`MAX_CHAINS`) of ``sampler``
    over the data; ``trajectory``: (K, B, 2), K snapshots from the start to the end. Each
    path fades in from its start (hollow circle) to its end (dot): the wide jumps at large
    sigma stay in the background, the last steps onto the data stand out."""
    n = min(n_chains, MAX_CHAINS, trajectory.shape[1])
    paths = trajectory[:, :n].double().numpy()                   # (K, n, 2)
    fade = np.linspace(0.0, 1.0, len(paths) - 1) ** 2            # segment k of K - 1
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(*data[:2000].T, s=2, alpha=0.3, color="tab:gray")
    for chain in range(n):
        colour = plt.get_cmap("tab10")(chain % 10)
        path = paths[:, chain]
        segments = np.stack([path[:-1], path[1:]], axis=1)        # (K - 1, 2 ends, 2)
        colours = np.tile(colour, (len(segments), 1))
        colours[:, 3] = 0.05 + 0.85 * fade
        ax.add_collection(LineCollection(segments, colors=colours, linewidths=1.2))
        ax.scatter(*path[0], s=30, facecolors="none", edgecolors=[colour], alpha=0.6,
                   label="start" if chain == 0 else None)
        ax.scatter(*path[-1], s=30, color=[colour], edgecolors="black", zorder=3,
                   label="end" if chain == 0 else None)
    x0, x1, y0, y1 = _bounds(torch.cat([data, trajectory[-1]]))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.legend(loc="upper right")
    ax.set_title(f"{sampler}: {n} chains, faint early steps to bold last ones")
    ax.set_aspect("equal")
    return fig


def save_figure(fig, path: str | Path):
    """Render ``fig`` once, save it as PNG and return the picture as a (H, W, 3) uint8 array
    (for TensorBoard)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.set_dpi(100)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    Image.fromarray(pixels).save(path)
    return pixels


# torchvision's default padding between the images of a grid, painted white so that the
# border shows on dark images (digits, MNIST) as on light ones.
GRID_PADDING, GRID_PAD_VALUE = 2, 1.0


def image_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """A (3, H, W) grid of images in [0, 1] (clamped), images: (B, C, h, w), with a
    :data:`GRID_PADDING` pixel white border around each."""
    from torchvision.utils import make_grid      # here: torchvision is slow to import

    nrow = nrow or max(1, int(len(images) ** 0.5))
    return make_grid(images.clamp(0, 1), nrow=nrow, padding=GRID_PADDING,
                     pad_value=GRID_PAD_VALUE)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Save :func:`image_grid` of images in [0, 1] (values clamped) as PNG."""
    from torchvision.utils import save_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    save_image(images.clamp(0, 1), path, nrow=nrow, padding=GRID_PADDING,
               pad_value=GRID_PAD_VALUE)
