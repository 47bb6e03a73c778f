"""Image sampling: inpainting, interpolation, the chain's record, streaming to disk, and
ncsn-sample's image modes on a tiny digits checkpoint."""
import math
import weakref

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from ncsn import training
from ncsn.config import config_dir
from ncsn.data.images import ModelSpace
from ncsn.evaluate.files import SampleFiles
from ncsn.image_io import load_images, save_gif, to_uint8, write_stream
from ncsn.image_sampling import (KnownPixels, TrajectoryRecorder, inpaint, interpolate,
                                 make_mask)
from ncsn.generate import sampler_config
from ncsn.outputs import write_samples
from ncsn.checkpoint import load_checkpoint
from ncsn.registry import ConfigError
from ncsn.sampling import annealed_langevin
from conftest import TINY, compose_train, run_cli

SIGMAS = torch.tensor([1.0, 0.5, 0.2, 0.1])


def gaussian_score(x, sigma):
    """The exact score of N(0.5, 0.1^2 I) perturbed by sigma: -(x - 0.5) / (0.1^2 + sigma^2)."""
    return -(x - 0.5) / (0.01 + sigma[:, None, None, None] ** 2)


def zero_score(x, sigma):
    return torch.zeros_like(x)


def images(n=4, c=1, size=8, seed=0):
    # Multiples of 1/17 and other values whose round trip through [-1, 1] is not exact.
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- masks
def test_masks_mark_the_expected_pixels():
    half = make_mask("half", (2, 3, 8, 8))
    assert half.shape == (2, 1, 8, 8) and half[..., :4].all() and not half[..., 4:].any()
    center = make_mask("center", (1, 3, 8, 8), fraction=0.25)
    assert (~center).sum() == 16 and not center[0, 0, 2:6, 2:6].any()
    random = make_mask("random", (64, 1, 16, 16), fraction=0.3,
                       generator=torch.Generator().manual_seed(0))
    assert abs((~random).float().mean().item() - 0.3) < 0.02
    with pytest.raises(ValueError, match="half, center, random"):
        make_mask("top", (1, 1, 8, 8))


# ----------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("kind", ["half", "center", "random"])
@pytest.mark.parametrize("space", [ModelSpace(), ModelSpace(rescaled=True), ModelSpace(logit=True)])
def test_inpainting_leaves_known_pixels_exactly_equal_to_the_input(kind, space):
    y = images()
    mask = make_mask(kind, y.shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    out = inpaint(gaussian_score, y, mask, SIGMAS, step_lr=1e-3, n_steps_each=3, denoise=True,
                  to_model=space, to_data=space.inverse)
    known = mask.expand_as(y)
    assert torch.equal(out[known], y[known])
    assert torch.isfinite(out).all() and not torch.equal(out[~known], y[~known])


def test_known_pixels_are_the_data_perturbed_once_per_level():
    y = torch.zeros(64, 1, 16, 16)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    known = KnownPixels(y, mask, SIGMAS)
    x = torch.full_like(y, 7.0)
    first = known(x, 1)
    assert torch.equal(known(x, 1), first)                       # drawn once per level
    assert abs(first.std().item() - SIGMAS[1].item()) < 0.02     # y + sigma_1 z
    assert not torch.equal(known(x, 2), first)
    assert abs(known(x, 2).std().item() - SIGMAS[2].item()) < 0.01


def test_known_pixels_renoised_every_step_draw_one_normal_per_known_value():
    # NCSNv2's inpainting: before every step y + sigma_i z on the known half only, z drawn
    # with the shape of the known half, (B, C, H, W/2), so the draws are the reference's.
    y, mask = images(n=3, c=2), make_mask("half", (3, 2, 8, 8))
    known = KnownPixels(y, mask, SIGMAS, renoise="step")
    x = torch.full_like(y, 7.0)
    torch.manual_seed(3)
    first, second = known(x, 2), known(x, 2)
    torch.manual_seed(3)
    z1, z2 = torch.randn(3, 2, 8, 4), torch.randn(3, 2, 8, 4)
    assert torch.equal(first[..., :4], y[..., :4] + z1 * SIGMAS[2])
    assert torch.equal(second[..., :4], y[..., :4] + z2 * SIGMAS[2])
    assert (first[..., 4:] == 7.0).all() and (second[..., 4:] == 7.0).all()
    with pytest.raises(ValueError, match="level, step"):
        KnownPixels(y, mask, SIGMAS, renoise="never")


@pytest.mark.parametrize("renoise", ["level", "step"])
def test_inpainting_is_the_reference_loop_written_out(renoise):
    # The reference's anneal_Langevin_dynamics_inpainting on the left half. NCSN: per level,
    # y~ = y + sigma z drawn once; T times: known <- y~, then z, grad, x + a grad + sqrt(2a) z.
    # NCSNv2: T times: y~ drawn afresh, known <- y~, then z, grad, the same update.
    y, x0 = images(n=2, c=3), torch.rand(2, 3, 8, 8)
    step_lr, n_steps_each = 1e-3, 3
    torch.manual_seed(5)
    out = inpaint(gaussian_score, y, make_mask("half", y.shape), SIGMAS, step_lr, n_steps_each,
                  denoise=False, x_init=x0.clone(), renoise=renoise)
    torch.manual_seed(5)
    x = x0.clone()
    for sigma in SIGMAS:
        a = step_lr * (sigma / SIGMAS[-1]) ** 2
        corrupted = y[..., :4] + torch.randn(2, 3, 8, 4) * sigma
        for step in range(n_steps_each):
            if renoise == "step" and step > 0:
                corrupted = y[..., :4] + torch.randn(2, 3, 8, 4) * sigma
            x[..., :4] = corrupted
            grad = gaussian_score(x, sigma.expand(2))
            x = x + a * grad + torch.randn_like(x) * (2 * a).sqrt()
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.equal(out[..., :4], y[..., :4])


def test_inpainting_fills_the_unknown_pixels_from_the_model():
    # The exact score of N(0.5, 0.1^2 I) has independent pixels: whatever the known half, the
    # unknown pixels end as N(0.5, 0.1^2 + sigma_L^2), the last level's perturbed data.
    y = torch.zeros(256, 1, 8, 8)
    mask = make_mask("half", y.shape)
    torch.manual_seed(0)
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.05])
    out = inpaint(gaussian_score, y, mask, sigmas, step_lr=1e-3, n_steps_each=100,
                  denoise=False)
    filled = out[..., 4:]
    assert abs(filled.mean().item() - 0.5) < 0.005
    assert abs(filled.std().item() - math.sqrt(0.1 ** 2 + 0.05 ** 2)) < 0.005


# ----------------------------------------------------------------------------- interpolation
def test_interpolation_with_zero_score_is_the_noise_mixture():
    # With s = 0 each chain is start + sum sqrt(alpha) z_k with z_k = cos t_k z_p + sin t_k z_q:
    # linear in (z_p, z_q), so chain k is cos t_k (chain 0) + sin t_k (chain K-1) about the start.
    start = torch.rand(3, 1, 4, 4)
    out = interpolate(zero_score, SIGMAS, start, step_lr=1e-2, n_steps_each=2,
                      n_interpolations=5, denoise=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 5, 1, 4, 4)
    theta = torch.linspace(0, math.pi / 2, 5)
    first, last = out[:, 0] - start, out[:, -1] - start
    for k in range(5):
        expected = start + theta[k].cos() * first + theta[k].sin() * last
        assert torch.allclose(out[:, k], expected, atol=1e-5)


def test_interpolation_end_points_do_not_depend_on_the_number_of_steps_between():
    start = torch.rand(2, 1, 8, 8)
    run = lambda k, **kw: interpolate(gaussian_score, SIGMAS, start, 1e-3, 3, k,
                                      generator=torch.Generator().manual_seed(0), **kw)
    two, seven = run(2), run(7)
    assert torch.allclose(two[:, 0], seven[:, 0], atol=1e-6)
    assert torch.allclose(two[:, 1], seven[:, -1], atol=1e-6)
    assert not torch.allclose(seven[:, 0], seven[:, -1])
    # Interpolated starts with one shared noise: the end points start at start and end.
    end = torch.rand(2, 1, 8, 8)
    shared = interpolate(zero_score, SIGMAS, start, 1e-3, 3, 4, denoise=False, end=end,
                         interpolate_noise=False, center=0.5)
    assert torch.allclose(shared[:, 0] - start, shared[:, -1] - end, atol=1e-6)


def test_interpolation_is_the_reference_loop_written_out():
    # NCSNv2's anneal_Langevin_dynamics_interpolation: every row's start repeated K times;
    # every step: grad, then z_p and z_q of shape (R, C, H, W), noise = z_p cos t + z_q sin t
    # with t = linspace(0, pi/2, K) in float32, x + a grad + noise sqrt(2a); no denoising.
    start, step_lr, n_steps_each, k = torch.rand(2, 1, 4, 4), 1e-3, 2, 3
    torch.manual_seed(9)
    out = interpolate(gaussian_score, SIGMAS, start, step_lr, n_steps_each, k)
    torch.manual_seed(9)
    x = start[:, None].repeat(1, k, 1, 1, 1).reshape(-1, 1, 4, 4)
    angles = torch.linspace(0, math.pi / 2, k)
    for sigma in SIGMAS:
        a = step_lr * (sigma / SIGMAS[-1]) ** 2
        for _ in range(n_steps_each):
            grad = gaussian_score(x, sigma.expand(len(x)))
            z_p, z_q = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
            noise = (z_p[:, None] * angles.cos()[None, :, None, None, None]
                     + z_q[:, None] * angles.sin()[None, :, None, None, None])
            x = x + a * grad + noise.reshape(-1, 1, 4, 4) * (2 * a).sqrt()
    assert torch.equal(out.reshape(-1, 1, 4, 4), x)


# ----------------------------------------------------------------------------- streams
def batches_of(total, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    for start in range(0, total, size):
        yield torch.rand(min(size, total - start), 3, 6, 6, generator=g)


@pytest.mark.parametrize("save_as", ["png", "npz", "both"])
def test_stream_writes_exactly_n_samples(tmp_path, save_as):
    kept = write_stream(batches_of(23, 5), tmp_path, save_as, n_total=23, keep=7,
                        progress=False)
    assert kept.shape == (7, 3, 6, 6)
    pngs = sorted((tmp_path / "images").glob("*.png"))
    shards = sorted((tmp_path / "shards").glob("samples_*.npz"))
    if save_as in ("png", "both"):
        assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(23)]
    if save_as in ("npz", "both"):
        assert len(shards) == 5 and sum(len(np.load(s)["samples"]) for s in shards) == 23
    expected = torch.cat(list(batches_of(23, 5)))
    files = SampleFiles(tmp_path)                                  # what ncsn-eval reads
    assert len(files) == 23 and files.shape == (3, 6, 6)
    back = torch.cat(list(files.batches(4)))
    assert torch.equal(to_uint8(back), to_uint8(expected))        # the 8-bit pixels
    assert (back - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_stream_holds_one_batch_at_a_time(tmp_path):
    alive = {}

    def batches():
        for k in range(6):
            assert not [j for j in alive if j < k - 1], "an old batch is still in memory"
            batch = torch.rand(4, 1, 8, 8)
            alive[k] = True
            weakref.finalize(batch, alive.pop, k)
            yield batch
    write_stream(batches(), tmp_path, "both", keep=6, progress=False)


def test_load_images_resizes_files_and_folders(tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "more").mkdir()
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "more" / "b.png")
    x = load_images([tmp_path / "a.png", tmp_path / "more"], channels=1, image_size=8)
    assert x.shape == (2, 1, 8, 8) and x[0].max() == 0 and x[1].min() == 1
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_images([tmp_path / "nope.png"], 1, 8)


# ----------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("denoise", [False, True])
def test_gif_has_one_frame_per_noise_level_and_the_start(tmp_path, denoise):
    x = torch.rand(6, 1, 8, 8)
    recorder = TrajectoryRecorder(n_chains=4)
    recorder.start(x)
    x = annealed_langevin(gaussian_score, x, SIGMAS, 1e-3, 3, denoise, known=recorder)
    recorder.finish(x)
    assert len(recorder.frames) == len(SIGMAS) + 1
    assert recorder.frames[0].shape == (4, 1, 8, 8) and recorder.frames[0].dtype == torch.uint8
    assert torch.equal(recorder.frames[-1], to_uint8(x[:4].clamp(0, 1)).permute(0, 3, 1, 2))
    save_gif(recorder.frames, tmp_path / "chain.gif")
    assert Image.open(tmp_path / "chain.gif").n_frames == len(SIGMAS) + 1


# ----------------------------------------------------------------------------- ncsn-sample
@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A digits checkpoint of a tiny U-Net after two steps: enough to exercise sampling."""
    run_dir = tmp_path_factory.mktemp("digits")
    cfg = compose_train(["experiment=digits", "model.ch=8", "noise.num_scales=4",
                         "trainer.n_steps=2", "trainer.n_plot_samples=0", "trainer.batch_size=8",
                         "trainer.device=cpu", "trainer.progress=false", "sampler.n_steps_each=2"])
    return training.train(cfg, run_dir)


def sample_config(ckpt, out, *overrides):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("sample", overrides=[f"ckpt={ckpt}", f"out={out}", *overrides])


def run_sample(ckpt, out, *overrides):
    cfg, ckpt = sample_config(ckpt, out, *overrides), load_checkpoint(ckpt)
    return write_samples(ckpt, sampler_config(ckpt["config"]["sampler"]), cfg, out)


def test_sample_streams_images_with_a_grid_and_an_animation(digits_ckpt, tmp_path):
    run_sample(digits_ckpt, tmp_path, "n_samples=11", "batch_size=4", "save_as=both",
               "save_trajectory=true", "trajectory_chains=4", "grid_size=9")
    assert len(list((tmp_path / "images").glob("*.png"))) == 11
    shards = sorted((tmp_path / "shards").glob("*.npz"))
    assert [len(np.load(s)["samples"]) for s in shards] == [4, 4, 3]
    assert np.load(shards[0])["samples"].shape[1:] == (8, 8, 1)
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (3 * 34 + 2, 3 * 34 + 2)       # 3x3 digits enlarged to 32 px, padding 2
    assert Image.open(tmp_path / "trajectories.gif").n_frames == 4 + 1
    assert (tmp_path / "trajectories.png").is_file()


def test_inpaint_mode_keeps_the_test_digits_known_half(digits_ckpt, tmp_path):
    run_sample(digits_ckpt, tmp_path, "mode=inpaint", "inpaint.n_images=3",
               "inpaint.n_completions=2", "inpaint.mask=half")
    saved = np.load(tmp_path / "inpainting.npz")
    known, completions = saved["images"], saved["completions"]
    assert completions.shape == (3, 2, 1, 8, 8)
    assert np.array_equal(completions[..., :4], np.broadcast_to(known[:, None, ..., :4],
                                                                  completions[..., :4].shape))
    assert Image.open(tmp_path / "inpainting.png").size == (4 * 34 + 2, 3 * 34 + 2)


def test_interpolate_mode_writes_rows(digits_ckpt, tmp_path):
    run_sample(digits_ckpt, tmp_path, "mode=interpolate", "interpolation.n_rows=2",
               "interpolation.n_interpolations=5", "interpolation.vary=both")
    assert np.load(tmp_path / "interpolation.npz")["samples"].shape == (2, 5, 1, 8, 8)
    assert (tmp_path / "interpolation.png").is_file()


def test_cli_inpaints_image_files(digits_ckpt, tmp_path):
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "out"
    result = run_cli("ncsn-sample", f"ckpt={digits_ckpt}", f"out={out}", "mode=inpaint",
                     f"inpaint.images=[{tmp_path}/0.png,{tmp_path}/1.png]",
                     "inpaint.mask=center", "inpaint.n_completions=1")
    assert result.returncode == 0, result.stderr
    saved = np.load(out / "inpainting.npz")
    mask = saved["mask"].astype(bool)
    assert np.array_equal(saved["completions"][:, 0][np.broadcast_to(mask, (2, 1, 8, 8))],
                          saved["images"][np.broadcast_to(mask, (2, 1, 8, 8))])


def test_unknown_mode_and_point_checkpoints_are_config_errors(digits_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="sample, inpaint, interpolate"):
        run_sample(digits_ckpt, tmp_path, "mode=paint")
    points = training.train(compose_train(TINY + ["trainer.n_steps=2"]), tmp_path / "points")
    with pytest.raises(ConfigError, match="works on images"):
        run_sample(points, tmp_path / "out", "mode=inpaint")


def test_inpaint_options_reach_the_chain_and_a_bad_one_is_named(digits_ckpt, tmp_path):
    def completions(*options):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        run_sample(digits_ckpt, out, "mode=inpaint", "inpaint.n_images=2",
                   "inpaint.n_completions=1", *options)
        return np.load(out / "inpainting.npz")["completions"]
    default = completions()
    assert np.array_equal(default, completions("inpaint.renoise=level", "inpaint.denoise=false"))
    assert not np.array_equal(default, completions("inpaint.renoise=step"))
    assert not np.array_equal(default, completions("inpaint.denoise=true"))
    with pytest.raises(ConfigError, match="renoise must be one of"):
        completions("inpaint.renoise=never")


def test_interpolation_denoises_only_when_asked(digits_ckpt, tmp_path):
    rows = {}
    for denoise in ("false", "true"):
        run_sample(digits_ckpt, tmp_path / denoise, "mode=interpolate", "interpolation.n_rows=1",
                   "interpolation.n_interpolations=3", f"interpolation.denoise={denoise}")
        rows[denoise] = np.load(tmp_path / denoise / "interpolation.npz")["samples"]
    assert not np.array_equal(rows["false"], rows["true"])
