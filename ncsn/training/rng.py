"""torch's global random state, saved and set back, and dropout's own stream under DDP."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ncsn import distributed
from ncsn.data.order import derived_seed


def generator_state(device: torch.device) -> Tensor:
    """The state of torch's default generator for ``device`` (the CPU's or the GPU's)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_generator_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """torch's global random state: the CPU generator's, and the device's on CUDA."""
    return (torch.get_rng_state(),
            generator_state(device) if device.type == "cuda" else None)


def set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        set_generator_state(device, state[1])


class DropoutStream:
    """Dropout's masks from a random stream of this rank's own, as in any DDP trainer.

    The objectives draw from torch's global generator in step on every rank (each keeps its
    rows of the global batch's draws); dropout drawing from it too would give every rank the
    same masks for different images. Around each training-mode forward pass of ``net`` the
    device's generator is swapped for this stream, which each step seeds from (seed, rank,
    step): nothing to checkpoint, and a resumed run draws the masks the uninterrupted one
    drew. With dropout, N ranks are therefore not bit-equal to one process.
    """

    def __init__(self, net: nn.Module, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.state: Tensor | None = None
        self.saved: Tensor | None = None
        net.register_forward_pre_hook(self._enter)
        net.register_forward_hook(self._leave)

    def start_step(self, step: int) -> None:
        seed = derived_seed(self.seed, 2, distributed.rank(), step)
        self.state = torch.Generator(self.device).manual_seed(seed).get_state()

    def _enter(self, module: nn.Module, args) -> None:
        if module.training and self.state is not None:
            self.saved = generator_state(self.device)
            set_generator_state(self.device, self.state)

    def _leave(self, module: nn.Module, args, output) -> None:
        if self.saved is not None:
            self.state = generator_state(self.device)
            set_generator_state(self.device, self.saved)
            self.saved = None
