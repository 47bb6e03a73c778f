"""ncsn-import: convert a checkpoint of the authors' code (ermongroup/ncsn, ermongroup/ncsnv2:
see :mod:`ncsn.reference`; yang-song/score_sde_pytorch with ``format=score_sde``: see
:mod:`ncsn.reference_sde`) with its run's config into an ncsn checkpoint."""
from __future__ import annotations

import logging
import sys

from ncsn.cli.common import run_cli
from ncsn.registry import ConfigError

log = logging.getLogger("ncsn.import")
KEYS = ("src", "config", "out")
OPTIONAL_KEYS = ("format",)
FORMATS = ("ermongroup", "score_sde")
USAGE = ("usage: ncsn-import src=CHECKPOINT.pth config=CONFIG.yml out=OUT.pt\n"
         "       ncsn-import src=checkpoint_N.pth format=score_sde config=NAME|FILE out=OUT.pt\n\n"
         "Converts a checkpoint written by the reference code (ncsn's anneal_runner: "
         "checkpoint.pth; ncsnv2's ncsn_runner: checkpoint_<step>.pth, with the EMA weights "
         "when the run kept them) and the config.yml of its run into an ncsn checkpoint that "
         "ncsn-sample and ncsn-eval take. The sigma table, the sampler settings and the data "
         "preprocessing come from the config.\n\n"
         "format=score_sde: a checkpoint of yang-song/score_sde_pytorch's run_lib.py "
         "(checkpoints/checkpoint_<n>.pth: {optimizer, model, ema, step}) of NCSN++ with the "
         "VE SDE; config is the name of the released configuration (ve/cifar10_ncsnpp_continuous, "
         "ve/cifar10_ncsnpp_deep_continuous, ve/church_ncsnpp_continuous, ...) or a YAML or "
         "JSON file of its fields (training, data, model, sampling). The EMA weights become "
         "the checkpoint's ema, which sampling uses.")


def parse_args(argv: list[str]) -> dict[str, str]:
    """``key=value`` arguments, each of ``KEYS`` exactly once."""
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS + OPTIONAL_KEYS:
            raise ConfigError(f"unknown argument {arg!r}; ncsn-import takes "
                              f"{' '.join(k + '=...' for k in KEYS)} [format=score_sde]")
        args[key] = value
    if args.get("format", "ermongroup") not in FORMATS:
        raise ConfigError(f"format={args['format']!r}: ncsn-import reads the formats "
                          f"{', '.join(FORMATS)} (ermongroup: ncsn's and ncsnv2's runners, the "
                          f"default)")
    missing = [k for k in KEYS if not args.get(k)]
    if missing:
        raise ConfigError(f"missing {', '.join(k + '=...' for k in missing)}; "
                          f"usage: ncsn-import src=CHECKPOINT config=CONFIG_YML out=OUT.pt")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(USAGE)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def job():
        from ncsn.checkpoint import atomic_save
        from ncsn.reference import import_reference
        from ncsn.reference_sde import import_score_sde

        args = parse_args(argv)
        convert = (import_score_sde if args.get("format") == "score_sde" else import_reference)
        ckpt = convert(args["src"], args["config"])
        atomic_save(ckpt, args["out"])
        cfg = ckpt["config"]
        log.info("ncsn-import: %s checkpoint, step %d, model %s, %d noise levels, EMA %s -> %s",
                 ckpt["source"]["layout"], ckpt["step"], cfg["model"]["name"],
                 len(ckpt["sigmas"]), "yes" if ckpt["ema"] is not None else "no", args["out"])
    run_cli("ncsn-import", job)


if __name__ == "__main__":
    main()
