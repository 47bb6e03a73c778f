"""ncsn-sample: rebuild a model from a checkpoint, sample, write samples.npz and samples.png."""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ncsn.cli.common import check_keys, run_cli
from ncsn.config import config_dir, register_configs

register_configs()
log = logging.getLogger("ncsn.sample")


def overridden_sampler(cfg: DictConfig, overrides: list[str]) -> tuple[dict, DictConfig | None]:
    """From the command line's overrides: the sampler keys set one by one, and the whole
    sampler config when ``sampler=NAME`` picked another one."""
    keys, replaced = {}, None
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "sampler":
            replaced = cfg.sampler
        elif key.startswith("sampler."):
            keys[key[len("sampler."):]] = OmegaConf.select(cfg, key)
    return keys, replaced


@hydra.main(config_path=config_dir(), config_name="sample", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from ncsn.checkpoint import load_checkpoint
    from ncsn.generate import sampler_config
    from ncsn.outputs import write_samples

    def job():
        check_keys(cfg)
        ckpt = load_checkpoint(cfg.ckpt)
        keys, replaced = overridden_sampler(cfg, HydraConfig.get().overrides.task)
        sampler_cfg = sampler_config(ckpt["config"]["sampler"], keys,
                                     None if replaced is None else OmegaConf.to_container(replaced))
        log.info("sampler: %s", OmegaConf.to_container(sampler_cfg))
        out = Path(HydraConfig.get().runtime.output_dir)
        write_samples(ckpt, sampler_cfg, cfg, out)
    run_cli("ncsn-sample", job)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
