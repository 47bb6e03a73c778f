"""Pictures a user looks at: image grids with a visible border, readable 2-D trajectories."""
import numpy as np
import torch
from matplotlib.collections import LineCollection
from PIL import Image

from ncsn import viz


def test_a_saved_grid_has_a_two_pixel_white_border_around_each_image(tmp_path):
    k, n, nrow = 5, 6, 3                                   # six black 5x5 images, two rows
    viz.save_grid(torch.zeros(n, 3, k, k), tmp_path / "grid.png", nrow=nrow)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    assert grid.shape == (2 * (k + 2) + 2, nrow * (k + 2) + 2)
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()       # the outer border
    assert (grid[:, 2 + k:2 + k + 2] == 255).all()                       # between columns
    assert (grid[2:2 + k, 2:2 + k] == 0).all()                           # the first image
    assert viz.image_grid(torch.zeros(n, 1, k, k), nrow=nrow).shape == (3, *grid.shape)


def walk(n_steps: int, n_chains: int) -> torch.Tensor:
    """(K, B, 2) random walks from wide starts, shrinking onto the origin."""
    steps = torch.randn(n_steps, n_chains, 2, generator=torch.Generator().manual_seed(0))
    return steps * torch.linspace(2.0, 0.01, n_steps)[:, None, None]


def test_trajectories_show_a_few_chains_fading_in_from_start_to_end(tmp_path):
    data = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    fig = viz.trajectories_figure(walk(30, 64), data, n_chains=100, sampler="langevin")
    paths = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    assert len(paths) == viz.MAX_CHAINS                    # 64 chains given, 100 asked
    alpha = paths[0].get_colors()[:, 3]
    assert len(alpha) == 29 and alpha[0] < 0.1 < 0.9 <= alpha[-1]
    assert (np.diff(alpha) >= 0).all()
    assert "start" in fig.axes[0].get_legend_handles_labels()[1]
    viz.save_figure(fig, tmp_path / "trajectories.png")
    assert Image.open(tmp_path / "trajectories.png").size == (600, 600)

    fewer = viz.trajectories_figure(walk(30, 3), data)
    assert sum(isinstance(c, LineCollection) for c in fewer.axes[0].collections) == 3
