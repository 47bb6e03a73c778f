"""Sweeps through Hydra's submitit launcher: on a real SLURM cluster (marked ``slurm``; start
one on this machine with ``scripts/slurm_local.sh``), on this machine (``submitit_local``),
and the table of a multirun (``ncsn-eval sweep=DIR``)."""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from torch.utils.tensorboard import SummaryWriter

from conftest import BIN, REPO, TINY, compose_train, run_cli
from ncsn import training
from ncsn.checkpoint import load_checkpoint
from ncsn.config import config_dir
from ncsn.evaluate.multirun import format_sweep_table, sweep_jobs, sweep_table
from ncsn.registry import ConfigError


def _launcher_missing() -> str | None:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return "hydra-submitit-launcher is not installed (pip install 'ncsn[slurm]')"
    return None


def _cluster_missing() -> str | None:
    """Why the SLURM tests cannot run here, or None when a node is up."""
    if shutil.which("sbatch") is None:
        return "sbatch not found: no SLURM here (scripts/slurm_local.sh starts a one-node cluster)"
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True,
                                text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        return f"sinfo failed ({err}): start the cluster with scripts/slurm_local.sh"
    if not {"idle", "mixed", "allocated"} & set(states):
        return f"no SLURM node is up (sinfo: {states or 'nothing'}); run scripts/slurm_local.sh"
    return _launcher_missing()


LAUNCHER_MISSING, CLUSTER_MISSING = _launcher_missing(), _cluster_missing()
needs_launcher = pytest.mark.skipif(LAUNCHER_MISSING is not None, reason=str(LAUNCHER_MISSING))


def needs_cluster(test):
    """Marked ``slurm``; skipped, with the reason, where no SLURM node is up."""
    skip = pytest.mark.skipif(CLUSTER_MISSING is not None, reason=str(CLUSTER_MISSING))
    return pytest.mark.slurm(skip(test))


# One CPU and little memory per job: both points of a sweep run side by side on two cores.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=10", "trainer.num_threads=1"]


def _multirun(sweep_dir: Path, *overrides, timeout=300, **popen):
    return run_cli("ncsn-train", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides,
                   cwd=sweep_dir.parent, timeout=timeout, **popen)


# ----------------------------------------------------------------------------- the launchers
@needs_launcher
@pytest.mark.parametrize("gpus,tasks", [("null", 1), ("0", 1), ("4", 4)])
def test_slurm_launcher_runs_one_task_per_gpu_and_at_least_one(gpus, tasks):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm",
                                          f"hydra.launcher.gpus_per_node={gpus}"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == tasks
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0


@needs_launcher
def test_submitit_local_multirun_trains_every_point(tmp_path):
    sweep = tmp_path / "multirun"
    out = _multirun(sweep, "hydra/launcher=submitit_local", *TINY, "trainer.num_threads=1",
                    "noise.num_scales=5,10")
    assert out.returncode == 0, out.stderr[-3000:]
    for job, levels in (("0", 5), ("1", 10)):
        ckpt = load_checkpoint(sweep / job / "checkpoints" / "last.pt")
        assert ckpt["step"] == 40 and len(ckpt["sigmas"]) == levels
    table = run_cli("ncsn-eval", f"sweep={sweep}", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines() if re.match(r"[01] ", line)]
    assert [r[:3] for r in rows] == [["0", "noise.num_scales=5", "40"],
                                     ["1", "noise.num_scales=10", "40"]]


# ----------------------------------------------------------------------------- SLURM
@needs_cluster
def test_local_cluster_script_returns_at_once_when_up():
    start = time.monotonic()
    out = subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "the cluster is up" in out.stdout
    assert time.monotonic() - start < 10


@needs_cluster
def test_slurm_sweep_runs_every_point_to_the_end(tmp_path):
    sweep = tmp_path / "multirun"
    out = _multirun(sweep, *SLURM, *TINY, "noise.num_scales=5,10")
    assert out.returncode == 0, out.stderr[-3000:]
    for job, levels in (("0", 5), ("1", 10)):
        ckpt = load_checkpoint(sweep / job / "checkpoints" / "last.pt")
        assert ckpt["step"] == 40 and len(ckpt["sigmas"]) == levels
    tasks = {p.name.split("_")[1] for p in (sweep / ".submitit").iterdir()
             if re.fullmatch(r"\d+_\d+", p.name)}
    assert tasks == {"0", "1"}                       # one SLURM job (array task) per point


@needs_cluster
def test_slurm_sweep_with_bad_input_ends_with_its_one_line_instead_of_waiting(tmp_path):
    out = _multirun(tmp_path / "multirun", *SLURM, *TINY, "optim.schedule=bogus", timeout=180)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].endswith(
        "ncsn-train: error: optim.schedule must be 'constant' or 'cosine', got 'bogus'")


@needs_cluster
def test_slurm_job_of_two_tasks_is_one_ddp_run_with_the_single_process_weights(tmp_path):
    sweep = tmp_path / "multirun"
    overrides = [*TINY, "trainer.num_threads=1", "noise.num_scales=5"]
    out = _multirun(sweep, *SLURM, "hydra.launcher.tasks_per_node=2", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (sweep / "0" / "train.log").read_text()
    assert "2 processes" in log
    # Rank 0 alone writes the log: submitit's last line, from every task that has a log file.
    assert log.count("Job completed successfully") == 1, log
    ddp = load_checkpoint(sweep / "0" / "checkpoints" / "last.pt")
    single = load_checkpoint(training.train(compose_train(overrides), tmp_path / "single"))
    assert ddp["step"] == single["step"] == 40
    for part in ("model", "ema"):
        for key, value in single[part].items():
            torch.testing.assert_close(ddp[part][key], value, rtol=1e-5, atol=1e-6)


@needs_cluster
def test_a_sweep_waiting_on_jobs_that_cannot_start_says_so_once_for_each(tmp_path):
    # 4 CPUs a task on a node of fewer: SLURM queues the jobs and they pend for ever
    # (PartitionConfig). The multirun still waits; it must say which jobs and why.
    sweep, out = tmp_path / "multirun", tmp_path / "stdout.txt"
    with out.open("w") as stdout:
        proc = subprocess.Popen([str(BIN / "ncsn-train"), "-m", f"hydra.sweep.dir={sweep}",
                                 *SLURM, "hydra.launcher.cpus_per_task=64",
                                 "hydra.launcher.watch_every_s=0.5", *TINY, "seed=0,1"],
                                cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    job = None
    try:
        job = _slurm_job(sweep).split("_")[0]
        _wait_for(lambda: out.read_text().count("PartitionConfig") >= 2, "the two lines", 60,
                  proc)
        time.sleep(3)                                     # several more looks at squeue
    finally:
        proc.kill()
        if job is not None:
            subprocess.run(["scancel", job], timeout=30)
    lines = [line for line in out.read_text().splitlines() if "is pending" in line]
    assert len(lines) == 2, lines
    for task, line in zip((0, 1), sorted(lines)):
        assert f"SLURM job {job}_{task} is pending (PartitionConfig): it asks for more than " \
               f"its partition has" in line and "cpus_per_task=64," in line, line


def _slurm_job(sweep: Path, timeout: float = 120) -> str:
    """The SLURM id of the sweep's first job: the name of submitit's folder that holds the
    job's pickle (``.submitit/ID`` for one job, ``.submitit/ARRAY_TASK`` for several)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = sorted(p.parent.name for p in (sweep / ".submitit").glob("*/*_submitted.pkl"))
        if jobs:
            return jobs[0]
        time.sleep(0.2)
    raise AssertionError(f"no SLURM job appeared under {sweep / '.submitit'}")


def _wait_for(predicate, what: str, timeout: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True,
                          text=True, timeout=30).stdout.strip()


def _stop_and_requeue(tmp_path: Path, overrides: list[str], interrupt: list[str],
                      env: dict | None = None) -> Path:
    """Run a one-point SLURM sweep, ``interrupt`` its job once the first checkpoint is on
    disk, start the requeued job at once and wait for the sweep to end; returns the job's
    run folder."""
    sweep = tmp_path / "multirun"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([str(BIN / "ncsn-train"), "-m", f"hydra.sweep.dir={sweep}", *SLURM,
                             *overrides], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        job = _slurm_job(sweep)
        last = sweep / "0" / "checkpoints" / "last.pt"
        _wait_for(last.is_file, "the first checkpoint", 120, proc)
        subprocess.run([*interrupt, job], check=True, timeout=30)
        # A requeued job waits for its begin time (about two minutes); start it at once.
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if _squeue_state(job) == "PENDING BeginTime":
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"],
                               timeout=30)
            time.sleep(1)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", job], timeout=30)
    assert proc.returncode == 0, stderr[-3000:]
    log = (sweep / "0" / "train.log").read_text()
    resumed = [int(s) for s in re.findall(r"resumed \S+ at step (\d+)", log)]
    assert len(resumed) == 1 and 0 < resumed[0], log[-3000:]
    assert "requeued 1 time" in log
    return sweep / "0"


# scontrol requeue: what a preemption does (SIGTERM, then the job goes back to the queue);
# scancel --signal=USR2: submitit's warning before the time limit (the launcher's signal_delay_s),
# whose handler requeues the job itself.
@needs_cluster
@pytest.mark.parametrize("interrupt", [["scontrol", "requeue"], ["scancel", "--signal=USR2"]],
                         ids=["requeue", "usr2"])
def test_slurm_job_stopped_mid_training_resumes_to_the_weights_of_an_unstopped_run(
        tmp_path, interrupt):
    overrides = [*TINY, "trainer.n_steps=1000", "trainer.ckpt_every=50",
                 "trainer.num_threads=1", "noise.num_scales=5"]
    run = _stop_and_requeue(tmp_path, overrides, interrupt)
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")
    straight = load_checkpoint(training.train(compose_train(overrides), tmp_path / "straight"))
    assert stopped["step"] == straight["step"] == 1000
    for part in ("model", "ema"):
        for key, value in straight[part].items():
            assert torch.equal(stopped[part][key], value), (part, key)


# A plain sbatch script without hydra.run.dir: the requeued job must find its run folder
# (outputs/slurm-JOB/HASH), not start over in a new time-stamped one.
@needs_cluster
def test_a_requeued_sbatch_job_without_a_run_dir_resumes_its_run(tmp_path):
    overrides = [*TINY, "trainer.n_steps=1000", "trainer.ckpt_every=50",
                 "trainer.num_threads=1", "noise.num_scales=5"]
    script = tmp_path / "train.sh"
    script.write_text(f"#!/bin/bash\nexec {BIN / 'ncsn-train'} {' '.join(overrides)}\n")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    job = subprocess.run(["sbatch", "--parsable", "--requeue", "--cpus-per-task=1", "--mem=1G",
                          "--time=10", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm.out",
                          str(script)], env=env, capture_output=True, text=True, check=True,
                         timeout=30).stdout.strip()
    try:
        _wait_until(lambda: list(tmp_path.glob("outputs/*/*/checkpoints/last.pt")),
                    "the first checkpoint", 120)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        log = lambda: "".join(p.read_text() for p in tmp_path.glob("outputs/*/*/train.log"))
        _wait_until(lambda: "done: 1000 steps" in log() or _release(job), "the end", 240)
    finally:
        subprocess.run(["scancel", job], timeout=30)
    run_dir, = tmp_path.glob("outputs/*/*")
    assert run_dir.parent.name == f"slurm-{job}"
    text = (run_dir / "train.log").read_text()
    assert re.search(r"resumed \S+last.pt at step [1-9]", text), text[-3000:]
    assert "this SLURM job was requeued 1 time(s)" in text
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    straight = load_checkpoint(training.train(compose_train(overrides), tmp_path / "straight"))
    for part in ("model", "ema"):
        for key, value in straight[part].items():
            assert torch.equal(stopped[part][key], value), (part, key)


def _wait_until(predicate, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _release(job: str) -> bool:
    """Start a requeued job at once instead of after its two-minute hold; always False."""
    if _squeue_state(job) == "PENDING BeginTime":
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], timeout=30)
    return False


def _slow_scontrol_requeue(folder: Path, seconds: float) -> dict:
    """An environment whose ``scontrol requeue`` waits ``seconds`` first, as on a busy
    controller: a ``scontrol`` ahead on PATH (the job inherits it from sbatch) that sleeps,
    then runs the real one."""
    real = shutil.which("scontrol")
    folder.mkdir()
    (folder / "scontrol").write_text(f'#!/bin/sh\n[ "$1" = requeue ] && sleep {seconds}\n'
                                     f'exec {real} "$@"\n')
    (folder / "scontrol").chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


# Under SLURM_KILL_BAD_EXIT=1 (the launcher's setup) srun kills every task once one exits
# with an error: rank 1 must not exit before rank 0's `scontrol requeue` has returned.
@needs_cluster
@pytest.mark.parametrize("delay", [0, 6], ids=["prompt", "slow_requeue"])
def test_slurm_job_of_two_tasks_signalled_is_requeued_and_ends_as_an_unstopped_run(
        tmp_path, delay):
    overrides = [*TINY, "trainer.n_steps=400", "trainer.ckpt_every=20",
                 "trainer.num_threads=1", "noise.num_scales=5"]
    env = _slow_scontrol_requeue(tmp_path / "bin", delay) if delay else None
    run = _stop_and_requeue(tmp_path, [*overrides, "hydra.launcher.tasks_per_node=2"],
                            ["scancel", "--signal=USR2"], env)
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")
    straight = load_checkpoint(training.train(compose_train(overrides), tmp_path / "straight"))
    assert stopped["step"] == straight["step"] == 400
    for part in ("model", "ema"):
        for key, value in straight[part].items():
            torch.testing.assert_close(stopped[part][key], value, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the table
def _fake_job(root: Path, num: int, overrides: list[str], step=None, test_losses=(),
              evals=()) -> Path:
    """A job folder as ncsn-train -m and ncsn-eval leave it."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if step is not None:
        (job / "checkpoints").mkdir()
        torch.save({"step": step, "model": {"w": torch.zeros(3)}}, job / "checkpoints" / "last.pt")
    if test_losses:
        writer = SummaryWriter(str(job / "tb"))
        for s, loss in test_losses:
            writer.add_scalar("test/loss", loss, s)
        writer.close()
    for stamp, report in evals:
        (job / "eval" / stamp).mkdir(parents=True)
        (job / "eval" / stamp / "metrics.json").write_text(json.dumps(report))
    return job


def test_sweep_table_reads_each_jobs_overrides_step_test_loss_and_newest_metrics(tmp_path):
    common = ["trainer.n_steps=30", "dataset=moons"]
    _fake_job(tmp_path, 0, common + ["noise.num_scales=5"], step=30,
              test_losses=[(10, 2.0), (30, 0.5)],
              evals=[("2026-01-01_00-00-00", {"metrics": {"swd": 3.0, "energy": 1.0}}),
                     ("2026-01-02_00-00-00", {"metrics": {"swd": 2.0, "swd_std": 0.1}})])
    # A checkpoint sweep (ncsn-eval run=): the last checkpoint's metrics.
    _fake_job(tmp_path, 1, common + ["noise.num_scales=10"], step=20,
              evals=[("2026-01-01_00-00-00", {"checkpoints": [{"metrics": {"swd": 9.0}},
                                                              {"metrics": {"swd": 4.0}}]})])
    _fake_job(tmp_path, 10, common + ["noise.num_scales=20"])    # not started yet
    (tmp_path / ".submitit").mkdir()
    rows = sweep_table(tmp_path)
    assert [r.job for r in rows] == ["0", "1", "10"]
    assert [(r.step, r.test_loss) for r in rows] == [(30, 0.5), (20, None), (None, None)]
    assert [r.metrics for r in rows] == [{"swd": 2.0, "energy": 1.0}, {"swd": 4.0}, {}]
    text = format_sweep_table(rows).splitlines()
    assert text[0] == "every job: trainer.n_steps=30 dataset=moons"
    assert text[2].split() == ["0", "noise.num_scales=5", "30", "0.5", "2", "1"]
    assert text[4].split() == ["10", "noise.num_scales=20", "-", "-", "-", "-"]


def test_ncsn_eval_sweep_prints_the_table_and_writes_it_beside_the_jobs(tmp_path):
    _fake_job(tmp_path, 0, ["seed=1"], step=5)
    _fake_job(tmp_path, 1, ["seed=2"], step=7)
    out = run_cli("ncsn-eval", f"sweep={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [line.split()[:3] for line in out.stdout.splitlines()[1:3]] == [
        ["0", "seed=1", "5"], ["1", "seed=2", "7"]]
    csv_file, = (tmp_path / "eval").glob("*/sweep_table.csv")
    assert csv_file.read_text().splitlines()[1:] == ["0,seed=1,5,", "1,seed=2,7,"]


def test_ncsn_eval_sweep_refuses_a_missing_folder_in_one_line_without_making_it(tmp_path):
    out = run_cli("ncsn-eval", f"sweep={tmp_path / 'absent'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "is not a folder" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "absent").exists()


def test_sweep_table_refuses_a_folder_without_jobs(tmp_path):
    _fake_job(tmp_path / "multirun", 0, ["seed=1"])
    for folder in (tmp_path, tmp_path / "multirun" / "0"):     # above the jobs, or one job
        with pytest.raises(ConfigError, match="holds no job folders"):
            sweep_jobs(folder)
