"""Progress where no bar is shown: with stdout and stderr files (SLURM, nohup, | tee) the log
and the job's output hold a line every trainer.log_every steps."""
import re
import subprocess

from conftest import BIN, TINY, compose_train
from ncsn.training import nll_unit


def test_log_lines_every_log_every_steps_when_output_is_a_file(tmp_path):
    run_dir = tmp_path / "run"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        result = subprocess.run([str(BIN / "ncsn-train"), *TINY, f"hydra.run.dir={run_dir}"],
                                stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                timeout=240)
    assert result.returncode == 0, err.read_text()
    line = re.compile(r"step (\d+)/40: loss ([-+.\w]+), .* steps/s, .* samples/s, lr .*, .* left")
    for text in ((run_dir / "train.log").read_text(), out.read_text() + err.read_text()):
        found = [(int(m[1]), float(m[2])) for m in line.finditer(text)]
        assert [step for step, _ in found] == [10, 20, 30, 40], text
        assert all(loss == loss for _, loss in found)          # numbers, not nan


def test_a_flows_likelihood_is_named_in_bits_per_dim_on_images_and_nats_on_points():
    assert nll_unit(compose_train(["dataset=digits", "dataset.uniform_dequantization=true"]
                                  ).dataset) == " bits/dim"
    assert nll_unit(compose_train([]).dataset) == " nats"
