"""ncsn-train: compose the config, train, nothing else."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ncsn.cli.common import print_help, run_cli, run_over_ranks
from ncsn.cli.precheck import check_keys, check_train, precheck
from ncsn.config import config_dir, register_configs

register_configs()


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from ncsn import distributed
    from ncsn.training import train

    def job():
        distributed.init_distributed()          # the tasks of a SLURM job join here
        check_keys(cfg)
        check_train(cfg)                        # each job of a sweep too
        return train(cfg, HydraConfig.get().runtime.output_dir)
    run_cli("ncsn-train", job)


def main() -> None:
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print_help("ncsn-train", "train", "train a score-based generative model. Example: ncsn-train experiment=swissroll", sys.argv[1:])
        return
    precheck("ncsn-train", "train", check_train)
    run_over_ranks(_main)


if __name__ == "__main__":
    main()
