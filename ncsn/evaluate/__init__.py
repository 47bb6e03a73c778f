"""Evaluation: score samples on disk or drawn from checkpoints, compute reference statistics,
sweep the checkpoints of a run.

``run(cfg, out_dir)`` does what ``ncsn-eval`` does, from a composed config
(:class:`ncsn.eval_config.EvalConfig`); the parts take plain arguments, so a notebook can
use them without Hydra:

    options = EvalOptions(inception_weights="pt_inception-2015-12-05-6726825d.pth")
    tools = Instruments.build(["fid", "is"], options)
    tools.reference = load_reference("fid_stats_cifar10_train.npz")    # published mu, sigma
    files = SampleFiles("samples/")                                     # .npz, shards or PNGs
    scores = score_stream(files.batches(100), len(files), ["fid", "is"], tools)
    print(format_table(scores))

Everything streams: images go through the Inception network one batch at a time, and only
running statistics are kept -- the feature mean and covariance (FID), per-split class
marginals (IS) and a seeded subset of at most ``kid_max_features`` features (KID). Points
(2-D) and 8x8 digits are small and are held whole.

Modules: ``options`` (EvalOptions, metric names), ``files`` (samples on disk), ``streams``
(the accumulators), ``reference`` (statistics files and their cache), ``scoring``
(instruments, streams and checkpoints scored), ``report`` (table, JSON, TensorBoard, sweep
CSV and plot), ``runner`` (``run``).
"""
from ncsn.evaluate.files import SampleFiles
from ncsn.evaluate.options import FID_SAMPLES, METRICS, EvalOptions, Metric, parse_metrics
from ncsn.evaluate.reference import (Reference, check_reference, inception_reference,
                                     load_reference, reference_from_batches,
                                     reference_from_dataset, save_reference, stats_cache_path)
from ncsn.evaluate.report import (format_sweep, format_table, write_scores, write_sweep)
from ncsn.evaluate.runner import run, run_stats
from ncsn.evaluate.scoring import (Draw, Instruments, Scores, best_of, score_checkpoint,
                                   score_stream, sweep_checkpoints, toy_reference)
from ncsn.evaluate.streams import ImageScorer, InceptionScoreStream, Reservoir

__all__ = [
    "Draw", "EvalOptions", "FID_SAMPLES", "ImageScorer", "InceptionScoreStream", "Instruments",
    "METRICS", "Metric", "Reference", "Reservoir", "SampleFiles", "Scores", "best_of",
    "check_reference", "format_sweep", "format_table", "inception_reference",
    "load_reference", "parse_metrics", "reference_from_batches", "reference_from_dataset",
    "run", "run_stats", "save_reference", "score_checkpoint", "score_stream",
    "stats_cache_path", "sweep_checkpoints", "toy_reference", "write_scores", "write_sweep",
]
