"""Typed configuration schemas.

Every YAML option file starts from one of these dataclasses (its defaults list names
``/schema/<group>/<schema>@_here_``), so a misspelt key or a value of the wrong type fails
when Hydra composes the configuration, naming the key. :func:`register_configs` stores them
in Hydra's ConfigStore; the CLI calls it once before composing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ncsn.data.images import IMAGE_DATASETS
from ncsn.nets.ncsn import NCSNConfig
from ncsn.nets.ncsnpp import NCSNppConfig
from ncsn.nets.ncsnv2 import NCSNv2Config
from ncsn.nets.unet import UNetConfig
from ncsn.objectives import OBJECTIVES
from ncsn.parts import config_dir  # noqa: F401  (ncsn.config.config_dir, as before)
from ncsn.samplers import SAMPLERS


# ----------------------------------------------------------------------------- datasets
@dataclass
class ToyDataConfig:
    name: str = MISSING
    n_samples: int = 10_000          # training points, drawn once
    n_test: int = 2_000              # held-out points for the test loss
    seed: int = 0                    # seed of the draw (the test split uses seed + 1)


@dataclass
class SwissRollConfig(ToyDataConfig):
    noise: float = 1.0               # scikit-learn's noise, before the division by 10


@dataclass
class MoonsConfig(ToyDataConfig):
    noise: float = 0.05


@dataclass
class EightGaussiansConfig(ToyDataConfig):
    radius: float = 2.0
    std: float = 0.1


@dataclass
class CheckerboardConfig(ToyDataConfig):
    size: float = 4.0


@dataclass
class GaussianMixtureConfig(ToyDataConfig):
    means: List[List[float]] = field(default_factory=lambda: [[-5.0, -5.0], [5.0, 5.0]])
    weights: List[float] = field(default_factory=lambda: [0.2, 0.8])
    std: float = 1.0


# ----------------------------------------------------------------------------- models
@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: int = 128
    n_layers: int = 3
    activation: str = "softplus"


@dataclass
class ConditionalMLPConfig(MLPConfig):
    name: str = "cond_mlp"
    embedding: str = "log_sigma"     # multiplicative | log_sigma
    embedding_dim: int = 32
    scale_by_sigma: bool = False
    precond: str = "none"            # none | edm | ve: NVlabs/edm's EDMPrecond or VEPrecond around
                                     # the network (ncsn/nets/precond.py)
    sigma_data: float = 0.5          # precond=edm: the data's standard deviation (EDM's sigma_data)


@dataclass
class NICEConfig:
    name: str = "nice"               # NICE's MNIST setup (Dinh et al. 2015, Sec. 5.1)
    n_couplings: int = 4             # additive couplings, alternating odd/even partitions
    hidden: int = 1000               # units per hidden layer of each coupling MLP
    n_hidden: int = 5                # hidden layers per coupling MLP
    prior: str = "logistic"          # logistic (NICE's MNIST) | gaussian
    activation: str = "relu"         # relu (NICE) | softplus (the sliced score matching code)
                                     # | silu | elu


@dataclass
class RealNVPConfig:
    name: str = "realnvp"            # RealNVP as its authors' code (tensorflow/models real_nvp)
    n_scales: Optional[int] = None   # images: scales of the multi-scale architecture (null: 2);
                                     # points have none, and refuse it
    n_couplings: Optional[int] = None  # images: couplings of each mask per scale, checkerboard
                                     # then channel-wise (the last scale: one more checkerboard)
                                     # (null: 3); points: couplings (null: 4)
    hidden: int = 64                 # images: feature maps of the coupling ResNets at the first
                                     # scale (doubled per scale and for the channel-wise
                                     # couplings, the code's base_dim); points: MLP units
    n_hidden: int = 2                # images: residual blocks per coupling ResNet (the code's
                                     # residual_blocks); points: hidden layers per coupling MLP
    norm: str = "batch"              # batch (the paper's: batch norm in the ResNets and on every
                                     # coupling's output) | actnorm (none in them, Glow's actnorm
                                     # after every coupling) | none
    prior: str = "gaussian"


@dataclass
class GlowConfig:
    name: str = "glow"
    n_levels: int = 2                # images: levels L (squeeze, K steps, split); openai/glow's
                                     # --n_levels
    depth: int = 8                   # steps of flow K per level (points: in all); --depth
    hidden: int = 128                # channels (images) or units (points) of the coupling
                                     # networks; --width
    lu: bool = True                  # LU-decomposed 1x1 convolution; false: the plain one
    coupling: str = "affine"         # affine | additive; --flow_coupling 1 | 0
    learn_top: bool = True           # the learned prior of the last level; --learntop


# ----------------------------------------------------------------------------- noise
@dataclass
class NoiseConfig:
    name: str = "geometric"
    sigma_begin: Any = 1.0           # a float, or "auto": the largest pairwise data distance
    sigma_end: float = 0.01
    num_scales: Any = 10             # an int, or "auto": NCSNv2's gamma rule
    n_subsample: int = 2000          # points used to measure the largest pairwise distance
    continuous: bool = False         # train on sigma drawn per sample in [sigma_end, sigma_begin]
                                     # (networks that take sigma as a value), not on the table
    distribution: str = "log_uniform"  # continuous: log_uniform (score SDE) | log_normal (EDM)
    P_mean: float = -1.2             # log_normal: log sigma ~ N(P_mean, P_std^2), truncated to
    P_std: float = 1.2               # [sigma_end, sigma_begin]


# ----------------------------------------------------------------------------- training
@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    grad_clip: Optional[float] = None    # max gradient norm; null: no clipping
    warmup: int = 0                      # linear learning-rate warm-up steps
    schedule: str = "constant"           # constant | cosine (decay to 0 at trainer.n_steps)
    lr_rampup_kimg: Optional[float] = None   # EDM's ramp-up: lr times min(images seen / (this
                                         # * 1000), 1), on top of the above; null or 0: none


@dataclass
class TrainerConfig:
    n_steps: int = 5000
    batch_size: int = 128                # the global batch
    accumulate: int = 1                  # micro-batches per process and step: each process takes
                                         # its rows of the global batch in this many passes,
                                         # adding up their gradients (a full batch per step)
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    num_threads: Any = "auto"            # CPU threads for torch: N | auto (1 for small networks,
                                         # the free cores for large ones) | null: torch's default
    precision: str = "auto"              # auto (bf16 on CUDA where supported, else tf32; fp32 on
                                         # the CPU) | fp32 | tf32 | bf16 | fp16 (gradient scaling)
    channels_last: Any = "auto"          # image networks in channels-last layout; auto: on CUDA
    compile: bool = False                # torch.compile the network (docs/PERFORMANCE.md)
    fused_adam: Any = "auto"             # Adam's fused kernel; auto: on CUDA
    data_on_device: bool = True          # small image datasets held on the device as uint8
    ema: bool = True
    ema_rate: float = 0.999
    ema_halflife_kimg: Optional[float] = None  # EDM's EMA: the half-life in thousands of images
                                         # (per step mu = 0.5^(batch_size / half-life)) in
                                         # place of ema_rate; null: ema_rate
    ema_rampup_ratio: Optional[float] = 0.05   # with ema_halflife_kimg: the half-life is at most
                                         # this times the images seen so far (EDM's ramp-up);
                                         # null: none
    ckpt_every: int = 1000
    keep_last: int = 3                   # step checkpoints kept besides last.pt
    keep_best: bool = False              # also keep checkpoints/best.pt, the weights with the
                                         # lowest held-out loss (scored every sample_every)
    resume: Any = "auto"                 # auto (resume from the run dir's last.pt if there is
                                         # one, else start fresh; an unreadable last.pt: the
                                         # newest step_*.pt that reads) | true | false | PATH
                                         # (a checkpoint file, continued in this run's folder)
    log_every: int = 50
    sample_every: int = 0                # pictures and test loss every N steps; 0: at the end only
    n_plot_samples: int = 1000
    plot_sigma_index: int = -1           # which sigma the score-field picture shows
    progress: bool = True                # tqdm bar (quiet anyway when stderr is not a terminal)


@dataclass
class TrainConfig:
    seed: int = 0
    dataset: Any = MISSING
    model: Any = MISSING
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: Any = MISSING
    sampler: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class SampleConfig:
    @dataclass
    class Inpaint:
        images: Optional[List[str]] = None   # image files or folders; null: the test split
        n_images: int = 8                    # test-split images to complete (files: all of them)
        n_completions: int = 4               # completions drawn for each image
        mask: str = "half"                   # half (right half unknown) | center | random
        fraction: Optional[float] = None     # center: unknown share of the area (null: 0.25);
                                             # random: each pixel's chance to be unknown (null: 0.5)
        renoise: str = "level"               # annealed Langevin: level (NCSN's code) | step (NCSNv2's)
        denoise: bool = False                # neither reference's inpainting denoises at the end

    @dataclass
    class Interpolation:
        n_rows: int = 8                      # independent interpolations, one row each
        n_interpolations: int = 10           # samples per row, end points included
        vary: str = "noise"                  # noise: one start, the Langevin noise interpolated
                                             # (NCSNv2's repository) | init: the start interpolated,
                                             # one noise | both
        denoise: bool = False                # NCSNv2's interpolation does not denoise at the end

    ckpt: str = MISSING                  # a checkpoint written by ncsn-train
    out: str = MISSING                   # output folder
    mode: str = "sample"                 # sample | inpaint | interpolate (the last two: images)
    n_samples: int = 1000
    batch_size: Optional[int] = None     # null: points all at once, images 100 at a time
    seed: int = 0
    use_ema: bool = True
    device: str = "auto"
    save_as: str = "npz"                 # images: npz (shards/) | png (images/) | both | none
    grid_size: int = 64                  # images: how many samples.png shows
    save_trajectory: bool = False        # points: trajectories.png; images: trajectories.gif, .png
    trajectory_chains: int = 16          # images: chains in the animation
    trajectory_every: int = 1            # images: a frame every N noise levels
    inpaint: Inpaint = field(default_factory=Inpaint)
    interpolation: Interpolation = field(default_factory=Interpolation)
    sampler: Any = MISSING


class _TableSchemas(Mapping):
    """``{name: schema}`` of a table of part classes, as it is now (parts may register late)."""

    table: dict = {}

    def __getitem__(self, name):
        return self.table[name].Config

    def __iter__(self):
        return iter(self.table)

    def __len__(self):
        return len(self.table)


class LossSchemas(_TableSchemas):
    table = OBJECTIVES


class SamplerSchemas(_TableSchemas):
    table = SAMPLERS


SCHEMAS = {
    "dataset": {"swiss_roll": SwissRollConfig, "moons": MoonsConfig,
                "eight_gaussians": EightGaussiansConfig, "checkerboard": CheckerboardConfig,
                "gaussian_mixture": GaussianMixtureConfig, **IMAGE_DATASETS},
    "model": {"mlp": MLPConfig, "cond_mlp": ConditionalMLPConfig, "ncsn": NCSNConfig,
              "ncsnv2": NCSNv2Config, "unet": UNetConfig, "nice": NICEConfig,
              "realnvp": RealNVPConfig, "glow": GlowConfig, "ncsnpp": NCSNppConfig},
    "noise": {"geometric": NoiseConfig},
    # The objectives' and samplers' schemas are their classes' (ncsn.objectives,
    # ncsn.samplers), stored as they register; SCHEMAS["loss"] and ["sampler"] read the tables.
    "loss": LossSchemas(),
    "sampler": SamplerSchemas(),
    "optim": {"adam": OptimConfig},
    "trainer": {"default": TrainerConfig},
}


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (``schema/<group>/<name>``)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    # configs/hydra/launcher/slurm.yaml: one SLURM task per GPU, one task on a CPU-only node
    OmegaConf.register_new_resolver("ncsn_tasks_per_node", lambda gpus: max(1, gpus or 0),
                                    replace=True)
    # configs/train.yaml: hydra.run.dir
    OmegaConf.register_new_resolver("ncsn_run_dir", run_dir, replace=True)


def run_dir(stamp: str, overrides: str, env=None) -> str:
    """``ncsn-train``'s run directory: ``outputs/LAUNCH/DIGEST`` when the launcher names this
    launch (:func:`ncsn.distributed.launch_id`: a SLURM job, torchrun's run), so that a
    requeued job or restarted workers find the run and ``trainer.resume=auto`` resumes it;
    ``outputs/STAMP`` (the date and time) otherwise. DIGEST, 8 hex digits of the command
    line's overrides (``hydra.job.override_dirname``), keeps apart two runs of one job."""
    from ncsn.distributed import launch_id

    launch = launch_id(env)
    if launch is None:
        return f"outputs/{stamp}"
    return f"outputs/{launch}/{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"


def chosen_name(group: str, name: str) -> str:
    """How a log names a part: the option of config group ``group`` that the command line
    picked (``model=unet_small``), followed by the part's own ``name`` when the two differ
    (``"unet_small (unet)"``, unet_small being a smaller ``unet``); ``name`` alone outside a
    Hydra run, where no option was picked."""
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    return name if choice in (None, name) else f"{choice} ({name})"
