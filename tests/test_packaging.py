"""The package installs with its configs, from an editable install and from a wheel."""
import subprocess
import sys
import zipfile
from pathlib import Path

from ncsn.config import config_dir
from conftest import REPO


def test_configs_are_found_from_this_install():
    root = Path(config_dir())
    for entry in ("train.yaml", "sample.yaml", "eval.yaml"):
        assert (root / entry).is_file(), entry
    for group in ("dataset", "model", "noise", "loss", "sampler", "optim", "trainer", "experiment"):
        assert any((root / group).glob("*.yaml")), group


def test_built_wheel_carries_the_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("ncsn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("ncsn/configs/train.yaml", "ncsn/configs/sample.yaml",
                 "ncsn/configs/eval.yaml", "ncsn/configs/dataset/swiss_roll.yaml",
                 "ncsn/configs/experiment/swissroll.yaml", "ncsn/configs/setup/cifar10.yaml",
                 "ncsn/cli/train.py", "ncsn/losses.py",
                 "hydra_plugins/ncsn_launcher/slurm.py"):      # hydra/launcher=slurm
        assert name in names, name
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "ncsn-train = ncsn.cli.train:main" in scripts
    assert "ncsn-sample = ncsn.cli.sample:main" in scripts
    assert "ncsn-eval = ncsn.cli.eval:main" in scripts
    assert "ncsn-import = ncsn.cli.import_:main" in scripts
