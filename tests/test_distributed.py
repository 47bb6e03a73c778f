"""Data-parallel training (2 gloo processes on the CPU), resume=auto, and stop signals.

Two processes with the global batch split between them must follow one process with the
whole batch: the same data rows, the same sigma labels and noise for each row, gradients
averaged over equal shards. They agree only up to float rounding (a mean of two means is not
bit-for-bit the mean of all), hence the tolerance.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from ncsn import distributed, losses, registry
from ncsn import training
from ncsn.checkpoint import CheckpointError, load_checkpoint
from conftest import BIN, TINY, compose_train, spawn_ranks

K = 6                                                # steps of the DDP runs
RUN = TINY + [f"trainer.n_steps={K}", "trainer.ckpt_every=3", "trainer.log_every=2",
              "trainer.batch_size=32"]
WORKER_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, overrides, run_dirs, out_dir, fault):
    """One rank: join the group as torchrun would, train, and leave its outcome in a file."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_distributed()
    opened = count_opened_images() if fault == "count_opens" else None
    failing = 0 if fault.endswith("_rank0") else 1              # the rank that faults
    fault = fault.removesuffix("_rank0") if rank == failing else ""
    if fault == "build":
        def broken(cfg):
            raise registry.ConfigError(f"dataset broken on rank {rank} only")
        registry.build_data = broken
    if fault in ("step", "signal"):
        real = training.train_step

        def faulty(run, x, *shard):
            if run.step == 2 and fault == "step":
                raise RuntimeError(f"rank {rank} fell over at step 3")
            stats = real(run, x, *shard)
            if run.step == 2 and fault == "signal":
                os.kill(os.getpid(), signal.SIGUSR1)          # only this rank is signalled
            return stats
        training.loop.train_step = faulty
    try:
        path = training.train(compose_train(overrides), run_dirs[rank])
        outcome = {"ok": str(path), "opened": opened}
    except BaseException as err:
        outcome = {"error": type(err).__name__, "message": str(err),
                   "step": getattr(err, "step", -1)}
    torch.save(outcome, out_dir / f"rank{rank}.pt")
    distributed.shutdown()                          # as ncsn.cli.common.run_cli does


def count_opened_images() -> list[str]:
    """The paths of the image files this process opens from now on (PIL.Image.open)."""
    from PIL import Image

    opened, real = [], Image.open

    def counting(fp, *args, **kwargs):
        opened.append(str(getattr(fp, "name", fp)))
        return real(fp, *args, **kwargs)
    Image.open = counting
    return opened


def run_two_ranks(tmp_path, overrides, run_dirs, fault=""):
    """Start 2 ranks, wait (bounded) for both; returns their outcomes."""
    out_dir = tmp_path / f"outcomes_{time.monotonic_ns()}"
    out_dir.mkdir()
    spawn_ranks(_worker, (2, free_port(), overrides, run_dirs, out_dir, fault), WORKER_TIMEOUT)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def assert_same_weights(a, b, exact=False, atol=1e-6):
    for key in ("model", "ema"):
        for name in a[key] or {}:
            if exact:
                assert torch.equal(a[key][name], b[key][name]), (key, name)
            else:
                torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-4, atol=1e-6,
                                           msg=f"{key}.{name}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process with the whole global batch, K steps."""
    path = training.train(compose_train(RUN), tmp_path_factory.mktemp("single"))
    return load_checkpoint(path)


# ----------------------------------------------------------------------------- the draws
@pytest.mark.parametrize("loss", ["anneal_dsm", "ssm", "dsm", "ssm_rademacher"])
def test_each_shard_draws_its_rows_of_what_one_process_draws(loss):
    overrides = {"ssm": ["loss=ssm", "loss.annealed=true"],
                 "ssm_rademacher": ["loss=ssm", "loss.annealed=true",
                                    "loss.projection=rademacher"],
                 "dsm": ["loss=dsm", "model=mlp", "sampler=langevin"]}.get(loss, [])
    cfg = compose_train(overrides)
    sigmas = torch.linspace(1.0, 0.1, 10)
    objective = registry.build_objective(cfg.loss, cfg.model, sigmas)
    torch.manual_seed(0)
    net = registry.build_model(cfg.model, (2,), sigmas)
    x = torch.randn(8, 2)
    torch.manual_seed(1)
    whole, labels = objective(net, x)
    state_after_whole = torch.get_rng_state()
    for rows in (slice(0, 4), slice(4, 8)):
        torch.manual_seed(1)
        with losses.batch_shard(rows, 8):
            part, part_labels = objective(net, x[rows])
        torch.testing.assert_close(part, whole[rows], rtol=1e-6, atol=1e-6)
        if labels is not None:
            assert torch.equal(part_labels, labels[rows])
        # Every rank leaves the random stream where one process leaves it.
        assert torch.equal(torch.get_rng_state(), state_after_whole)


def test_a_batch_that_does_not_split_evenly_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(registry.ConfigError, match="multiple of 3"):
        distributed.shard(32)


# ----------------------------------------------------------------------------- DDP
def test_two_processes_follow_one_process_and_only_rank_0_writes(tmp_path, one_process):
    # Rank 1 is given a folder of its own: it must not even create it.
    run_dirs = [tmp_path / "run", tmp_path / "rank1"]
    outcomes = run_two_ranks(tmp_path, RUN, run_dirs)
    assert all("ok" in o for o in outcomes), outcomes
    ddp = load_checkpoint(run_dirs[0] / "checkpoints" / "last.pt")
    assert ddp["step"] == one_process["step"] == K
    assert_same_weights(ddp, one_process)
    assert not run_dirs[1].exists()
    assert sorted(p.name for p in (run_dirs[0] / "checkpoints").iterdir()) == [
        "last.pt", "step_00000003.pt", "step_00000006.pt"]


def test_ddp_stops_together_on_one_ranks_signal_and_resumes_exactly(tmp_path, one_process):
    run_dirs = [tmp_path / "run", tmp_path / "run"]
    stopped = run_two_ranks(tmp_path, RUN, run_dirs, fault="signal")
    # Rank 1 got SIGUSR1 during step 3; both ranks stop after the same step.
    assert [o["error"] for o in stopped] == ["TrainingInterrupted"] * 2, stopped
    assert stopped[0]["step"] == stopped[1]["step"] < K
    assert load_checkpoint(run_dirs[0] / "checkpoints" / "last.pt")["step"] == stopped[0]["step"]
    resumed = run_two_ranks(tmp_path, RUN, run_dirs)              # trainer.resume=auto
    assert all("ok" in o for o in resumed), resumed
    assert_same_weights(load_checkpoint(run_dirs[0] / "checkpoints" / "last.pt"), one_process)


@pytest.mark.parametrize("fault", ["build", "step", "step_rank0"])
def test_a_failure_on_one_rank_ends_both_with_its_message(tmp_path, fault):
    outcomes = run_two_ranks(tmp_path, RUN, [tmp_path / "run"] * 2, fault=fault)
    assert all("error" in o for o in outcomes), outcomes
    bad = 0 if fault.endswith("_rank0") else 1
    own = {"build": f"dataset broken on rank {bad} only", "step": f"rank {bad} fell over at step 3"}
    assert outcomes[bad]["message"] == own[fault.removesuffix("_rank0")]
    assert outcomes[1 - bad]["error"] == "RankFailed"
    if fault == "step_rank0":
        # The store of messages lived in rank 0's process: the other rank points to it.
        assert outcomes[1]["message"].startswith("rank 0 stopped (its message is above)")
    else:
        assert outcomes[1 - bad]["message"] == f"rank {bad}: {outcomes[bad]['message']}"
    assert not (tmp_path / "run" / "checkpoints" / "step_00000003.pt").exists()


# ----------------------------------------------------------------------------- resume=auto
def test_resume_auto_starts_fresh_then_resumes(tmp_path):
    straight = training.train(compose_train(TINY), tmp_path / "a")
    assert compose_train(TINY).trainer.resume == "auto"
    first = training.train(compose_train(TINY + ["trainer.n_steps=20"]), tmp_path / "b")
    assert load_checkpoint(first)["step"] == 20                # nothing to resume: fresh
    resumed = training.train(compose_train(TINY), tmp_path / "b")
    assert_same_weights(load_checkpoint(resumed), load_checkpoint(straight), exact=True)


def test_resume_false_starts_over_and_a_bad_value_is_named(tmp_path):
    training.train(compose_train(TINY + ["trainer.n_steps=20"]), tmp_path)
    again = training.train(compose_train(TINY + ["trainer.n_steps=10", "trainer.resume=false"]),
                           tmp_path)
    assert load_checkpoint(again)["step"] == 10
    # Any other value is a checkpoint file: one that is not there is named with the choices.
    with pytest.raises(CheckpointError, match="trainer.resume=yes: checkpoint not found: yes "
                                              r"\(trainer.resume takes auto, true, false or a "
                                              r"checkpoint file\)"):
        training.train(compose_train(TINY + ["trainer.resume=yes"]), tmp_path)


# ----------------------------------------------------------------------------- signals
SIGNALLED = TINY + ["trainer.n_steps=600", "trainer.ckpt_every=25"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = training.train(compose_train(SIGNALLED), tmp_path_factory.mktemp("uninterrupted"))
    return load_checkpoint(path)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_real_signal_checkpoints_and_a_rerun_ends_with_the_uninterrupted_weights(
        tmp_path, signum, uninterrupted):
    n_steps = uninterrupted["step"]
    run_dir = tmp_path / "run"
    command = [str(BIN / "ncsn-train"), *SIGNALLED, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step_00000025.pt").exists() and time.time() < deadline:
        time.sleep(0.02)                                          # the loop is running
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and signal.Signals(signum).name in stderr
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 0 < stopped_at < n_steps
    rerun = training.train(compose_train(SIGNALLED), run_dir)    # resume=auto: the default
    resumed = load_checkpoint(rerun)
    assert resumed["step"] == n_steps
    assert_same_weights(resumed, uninterrupted, exact=True)


def test_the_previous_handler_gets_the_signal_after_the_checkpoint(tmp_path, monkeypatch):
    # As submitit's handler: it must find the checkpoint written when it is called.
    seen = []

    def requeue(signum, frame):
        seen.append((signum, load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"]))
    previous = signal.signal(signal.SIGUSR2, requeue)
    real = training.train_step

    def signalled(run, x, *shard):
        stats = real(run, x, *shard)
        if run.step == 7:
            os.kill(os.getpid(), signal.SIGUSR2)
        return stats
    monkeypatch.setattr(training.loop, "train_step", signalled)
    try:
        with pytest.raises(training.TrainingInterrupted) as stopped:
            training.train(compose_train(TINY), tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, stopped.value.step)]
    assert signal.getsignal(signal.SIGUSR2) is previous


# ----------------------------------------------------------------------------- launchers
def test_ranks_come_from_torchrun_or_a_slurm_step_not_the_batch_script():
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                "MASTER_PORT": "1234"}
    assert distributed.process_env(torchrun) == {
        "rank": 1, "world_size": 4, "local_rank": 1, "master_addr": "h", "master_port": "1234"}
    slurm_step = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
                  "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node7", "SLURM_JOB_ID": "4242"}
    found = distributed.process_env(slurm_step)
    assert (found["rank"], found["world_size"], found["local_rank"]) == (3, 4, 1)
    assert found["master_port"] == str(20000 + 4242 % 20000)
    batch_script = {k: v for k, v in slurm_step.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert distributed.process_env(batch_script) is None
    assert distributed.process_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert distributed.process_env({}) is None


@pytest.mark.parametrize("nodelist,host", [
    ("node7", "node7"), ("gpu[001-002]", "gpu001"), ("gpu[007,001-002],cpu01", "gpu007"),
    ("cpu01,gpu[001-002]", "cpu01"), ("rack[2-3]-n[09-10]", "rack2-n09"), ("a-1,b-2", "a-1")])
def test_the_master_is_the_first_host_of_a_bracketed_node_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


def test_the_master_comes_from_the_node_list_where_scontrol_is_missing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")                    # no scontrol to ask
    found = distributed.process_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "16",
                                     "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_JOB_ID": "7"})
    assert (found["master_addr"], found["master_port"]) == ("gpu001", "20007")


@pytest.mark.parametrize("visible,local_rank,index", [
    (None, 3, 3), ("0,1,2,3", 3, 3), ("5", 3, 0), ("GPU-8f1c", 1, 0), ("", 2, 2)])
def test_a_task_bound_to_one_gpu_uses_cuda_0_not_its_local_rank(visible, local_rank, index):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert distributed.device_index(local_rank, env) == index


@pytest.mark.parametrize("env,launch", [
    ({}, None), ({"TORCHELASTIC_RUN_ID": "none"}, None),
    ({"TORCHELASTIC_RUN_ID": "3f2a"}, "torchrun-3f2a"),
    ({"SLURM_JOB_ID": "4242", "TORCHELASTIC_RUN_ID": "3f2a"}, "slurm-4242"),
    ({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "1"},
     "slurm-4242_1")])
def test_a_launch_is_named_by_its_slurm_job_or_torchrun_run(env, launch):
    assert distributed.launch_id(env) == launch


def test_the_restart_run_directory_is_the_launch_and_the_command_line():
    from ncsn.config import run_dir
    assert run_dir("2026-01-01/10-00-00", "seed=1", {}) == "outputs/2026-01-01/10-00-00"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2"}
    first, again = run_dir("a", "seed=1", slurm), run_dir("b", "seed=1", slurm)
    assert first == again and first.startswith("outputs/slurm-4242/")   # not the clock's
    assert run_dir("a", "seed=2", slurm) != first                # another run of the job
    assert distributed.restarts(slurm) == "this SLURM job was requeued 2 time(s)"
    assert distributed.restarts({"TORCHELASTIC_RESTART_COUNT": "1"}) == \
        "torchrun restarted the workers 1 time(s)"
    assert distributed.restarts({"TORCHELASTIC_RESTART_COUNT": "0"}) is None


def test_workers_that_torchrun_restarts_resume_their_run(tmp_path):
    # No hydra.run.dir: the restarted worker must find the first one's folder, not a new one.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=1", "--max-restarts=1", "-m", "ncsn.cli.train", *SIGNALLED]
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob("outputs/*/*/checkpoints/step_00000025.pt")):
        assert agent.poll() is None and time.time() < deadline, agent.communicate()[1][-3000:]
        time.sleep(0.05)
    worker = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True)
    os.kill(int(worker.stdout.split()[0]), signal.SIGKILL)        # a crash: no checkpoint
    _, stderr = agent.communicate(timeout=240)
    assert agent.returncode == 0, stderr[-3000:]
    run_dir, = tmp_path.glob("outputs/torchrun-*/*")
    log = (run_dir / "train.log").read_text()
    assert re.search(r"started fresh at step 0: no checkpoint \S+ to resume", log)
    assert re.search(r"resumed \S+last.pt at step [1-9]", log)
    assert "torchrun restarted the workers 1 time(s)" in log
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 600


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_the_ranks_of_a_launch_share_one_run_directory(tmp_path, launcher):
    # No hydra.run.dir: Hydra's time-stamped folder must be rank 0's on both ranks.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "ncsn.cli.train", *RUN]
    if launcher == "torchrun":
        commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node=2", *train[1:]]]
        envs = [env]
    else:                                   # two tasks of an srun step, as SLURM starts them
        job = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "localhost",
               "SLURM_JOB_ID": str(free_port()), "SLURM_RESTART_COUNT": "1"}
        commands = [train, train]
        envs = [{**env, **job, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in (0, 1)]
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=tmp_path, env=e, stdin=subprocess.DEVNULL)
                 for c, e in zip(commands, envs)]
    for process in processes:
        _, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").glob("*/*/config.yaml")]
    assert len(run_dirs) == 1, list((tmp_path / "outputs").glob("*/*"))
    assert run_dirs[0].parent.name.startswith(launcher)        # the launch's, see launch_id
    log = (run_dirs[0] / "train.log").read_text()
    assert log.count("step 6: checkpoint") == 1 and "2 processes" in log
    if launcher == "slurm":
        assert "requeued 1 time(s)" in log
