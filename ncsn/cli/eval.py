"""ncsn-eval: compose the config, then score a checkpoint, samples on disk or a whole run, or
compute reference statistics (``ncsn-eval stats dataset=NAME``); see :func:`ncsn.evaluate.run`."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ncsn.cli.common import (compose_checkpoint_sampler, print_help, run_cli, run_over_ranks,
                             sampler_overrides)
from ncsn.cli.precheck import check_ckpt_given, check_keys, precheck
from ncsn.config import config_dir, register_configs
from ncsn.eval_config import register_eval_configs

register_configs()
register_eval_configs()

SUMMARY = ("score samples and checkpoints (FID, IS, KID; digits and 2-D metrics) and compute "
           "reference statistics. Examples: ncsn-eval ckpt=RUN/checkpoints/last.pt "
           "metric=[fid,is]; ncsn-eval samples=DIR ref_stats=stats.npz; ncsn-eval run=RUN "
           "n_samples=1000; ncsn-eval sweep=MULTIRUN_DIR (a table of ncsn-train -m's jobs); "
           "ncsn-eval stats dataset=cifar10")


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from ncsn.evaluate import run
    from ncsn.metrics import InceptionWeightsNotFound

    def job():
        check_keys(cfg)
        keys, replaced = sampler_overrides(cfg, HydraConfig.get().overrides.task)
        return run(cfg, Path(HydraConfig.get().runtime.output_dir), keys, replaced)
    run_cli("ncsn-eval", job, expected=(InceptionWeightsNotFound,))


def _check_request(cfg: DictConfig) -> None:
    """What to score is named, and a checkpoint named exists: before the run's folder."""
    from ncsn.evaluate.runner import check_request  # the metrics' imports: not for --help

    check_request(cfg)
    check_ckpt_given(cfg)


def main() -> None:
    sys.argv[1:] = compose_checkpoint_sampler(sys.argv[1:])
    # `ncsn-eval stats ...` is the sub-command for reference statistics: mode=stats for Hydra
    if len(sys.argv) > 1 and sys.argv[1] == "stats":
        sys.argv[1] = "mode=stats"
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print_help("ncsn-eval", "eval", SUMMARY, sys.argv[1:], groups=("dataset", "sampler"),
                   checkpoint_sampler=True)
        return
    precheck("ncsn-eval", "eval", _check_request)
    run_over_ranks(_main)


if __name__ == "__main__":
    main()
