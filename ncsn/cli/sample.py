"""ncsn-sample: rebuild a model from a checkpoint and sample, inpaint or interpolate
(``mode=``); what is written where is described in :mod:`ncsn.outputs`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ncsn.cli.common import (compose_checkpoint_sampler, print_help, run_cli, run_over_ranks,
                             sampler_overrides)
from ncsn.cli.precheck import check_ckpt_given, check_keys, precheck
from ncsn.config import config_dir, register_configs

register_configs()
log = logging.getLogger("ncsn.sample")


@hydra.main(config_path=config_dir(), config_name="sample", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from ncsn.checkpoint import load_checkpoint
    from ncsn.generate import sampler_config
    from ncsn.outputs import write_samples

    def job():
        check_keys(cfg)
        check_ckpt_given(cfg)
        ckpt = load_checkpoint(cfg.ckpt)
        keys, replaced = sampler_overrides(cfg, HydraConfig.get().overrides.task)
        sampler_cfg = sampler_config(ckpt["config"]["sampler"], keys, replaced)
        settings = ", ".join(f"{k}={v}" for k, v in OmegaConf.to_container(sampler_cfg).items()
                             if k != "name")
        log.info("sampler=%s (%s)", sampler_cfg.name, settings)
        out = Path(HydraConfig.get().runtime.output_dir)
        write_samples(ckpt, sampler_cfg, cfg, out)
    run_cli("ncsn-sample", job)


def main() -> None:
    sys.argv[1:] = compose_checkpoint_sampler(sys.argv[1:])
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print_help("ncsn-sample", "sample", "draw samples from a checkpoint. Example: "
                   "ncsn-sample ckpt=RUN/checkpoints/last.pt out=DIR n_samples=5000",
                   sys.argv[1:], groups=("sampler",), checkpoint_sampler=True)
        return
    precheck("ncsn-sample", "sample", check_ckpt_given)
    run_over_ranks(_main)


if __name__ == "__main__":
    main()
