"""Print the parameter count of each image score network at its paper configuration.

Models are built on the meta device (shapes only, no memory), so this runs anywhere:

    python scripts/count_params.py
"""
from __future__ import annotations

import torch

from ncsn.nets.ncsn import NCSN
from ncsn.nets.ncsnpp import NCSNpp
from ncsn.nets.ncsnv2 import NCSNv2
from ncsn.nets.unet import UNet
from ncsn.noise import geometric_sigmas

# (row label, network class, one sample's shape, sigma table, constructor arguments)
PAPER_CONFIGS = [
    ("NCSN (CIFAR-10)", NCSN, (3, 32, 32), (1.0, 0.01, 10), dict(ngf=128)),
    ("NCSNv2 standard (CIFAR-10)", NCSNv2, (3, 32, 32), (50.0, 0.01, 232),
     dict(ngf=128, depth="standard")),
    ("NCSNv2 deeper (128 px)", NCSNv2, (3, 128, 128), (190.0, 0.01, 1086),
     dict(ngf=128, depth="deeper")),
    ("NCSNv2 deepest (256 px)", NCSNv2, (3, 256, 256), (348.0, 0.01, 2311),
     dict(ngf=128, depth="deepest")),
    ("U-Net default (32 px)", UNet, (3, 32, 32), (50.0, 0.01, 232), dict()),
    # score_sde's VE configurations (Song et al. 2021)
    ("NCSN++ (CIFAR-10)", NCSNpp, (3, 32, 32), (50.0, 0.01, 1000), dict()),
    ("NCSN++ deep (CIFAR-10)", NCSNpp, (3, 32, 32), (50.0, 0.01, 1000),
     dict(num_res_blocks=8)),
    ("NCSN++ 256 px (CelebA-HQ, FFHQ, LSUN)", NCSNpp, (3, 256, 256), (348.0, 0.01, 2000),
     dict(ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, progressive="output_skip",
          progressive_input="input_skip", dropout=0.0)),
]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    rows = []
    with torch.device("meta"):
        for label, net_class, shape, (begin, end, num), kwargs in PAPER_CONFIGS:
            net = net_class(shape, geometric_sigmas(begin, end, num), **kwargs)
            rows.append((label, "x".join(map(str, shape)), num, count_parameters(net)))
    header = ("network", "input", "sigmas", "parameters")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(4)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for label, shape, num, count in rows:
        print(f"{label.ljust(widths[0])} | {shape.ljust(widths[1])} | "
              f"{str(num).rjust(widths[2])} | {count:>{widths[3]},}")


if __name__ == "__main__":
    main()
