"""Data-parallel training over several processes (torch.distributed, DDP).

One process per device. Ranks come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or from a SLURM step's (``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the master is the first host of ``SLURM_JOB_NODELIST``,
the port is derived from ``SLURM_JOB_ID``). Without either, everything here is a no-op for a
single process: ``rank() == 0``, ``world_size() == 1``, ``is_main()``.

The backend is gloo for CPU tensors and NCCL for CUDA tensors. Every rank draws the same
global batch and the same random numbers (see ``ncsn.losses.batch_shard``) and keeps its own
disjoint rows, so a run over N processes follows the single process with the same global batch.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from contextlib import contextmanager
from datetime import datetime, timedelta

import torch
import torch.distributed as dist

# A rank that waits longer than this in a collective (a peer that hangs, or one far slower
# than the others over its share of the pictures) fails instead of hanging forever.
TIMEOUT = timedelta(minutes=float(os.environ.get("NCSN_DIST_TIMEOUT_MIN", "30")))


class RankFailed(RuntimeError):
    """Another rank failed; the message is that rank's one line, ``exit_code`` its status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[001-002,007],cpu01`` -> ``gpu001``,
    ``rack[1-2]-n[3-4]`` -> ``rack1-n3``, ``node7`` -> ``node7`` (SLURM's hostlist syntax:
    comma-separated groups, each a name with bracketed lists of numbers or ranges)."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0],
                  nodelist[:end])


def _slurm_master(env) -> tuple[str, str]:
    """The first host of the job (``scontrol show hostnames``, or the node list read here
    where scontrol is missing, as inside some containers) and a port from the job id."""
    nodes = env["SLURM_JOB_NODELIST"]
    try:
        host = subprocess.run(["scontrol", "show", "hostnames", nodes], check=True,
                              capture_output=True, text=True, timeout=60).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        host = first_host(nodes)
    port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    return host, str(port)


def process_env(env=None) -> dict | None:
    """rank, world_size, local_rank, master_addr, master_port of this process, or None for a
    single process. torchrun's variables win over SLURM's; SLURM's count only inside an
    ``srun`` step, whose tasks are the ranks (``SLURM_STEP_NUM_TASKS``, the step's share of
    the job's ``SLURM_NTASKS``), not in the batch script itself."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        found = {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                 "local_rank": int(env.get("LOCAL_RANK", 0)),
                 "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
                 "master_port": env.get("MASTER_PORT", "29500")}
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        addr, port = _slurm_master(env)
        found = {"rank": int(env["SLURM_PROCID"]),
                 "world_size": int(env["SLURM_STEP_NUM_TASKS"]),
                 "local_rank": int(env.get("SLURM_LOCALID", 0)),
                 "master_addr": env.get("MASTER_ADDR", addr),
                 "master_port": env.get("MASTER_PORT", port)}
    else:
        return None
    return found if found["world_size"] > 1 else None


def launch_id(env=None) -> str | None:
    """A name for this launch that its restarts keep, or None: ``slurm-JOB`` (an array's
    task: ``slurm-ARRAYJOB_TASK``; a requeued job keeps its id), ``torchrun-RUN`` (torchrun's
    rendezvous id, the same for every restart of its workers; ``none``, the static
    rendezvous's default without ``--rdzv-id``, names nothing)."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}"
    run = env.get("TORCHELASTIC_RUN_ID", "none")
    return None if run == "none" else f"torchrun-{run}"


def restarts(env=None) -> str | None:
    """What restarted this process, for the run's log: SLURM's requeues of the job, torchrun's
    restarts of its workers; None on a first start."""
    env = os.environ if env is None else env
    said = []
    if int(env.get("SLURM_RESTART_COUNT", "0")):
        said.append(f"this SLURM job was requeued {env['SLURM_RESTART_COUNT']} time(s)")
    if int(env.get("TORCHELASTIC_RESTART_COUNT", "0")):
        said.append(f"torchrun restarted the workers {env['TORCHELASTIC_RESTART_COUNT']} time(s)")
    return "; ".join(said) or None


def init_distributed() -> bool:
    """Join the process group when started as one of several ranks; True when distributed.

    Idempotent. CUDA processes use the GPU :func:`device_index`.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    found = process_env()
    if found is None:
        return False
    os.environ.setdefault("MASTER_ADDR", found["master_addr"])
    os.environ.setdefault("MASTER_PORT", found["master_port"])
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(device_index(found["local_rank"]))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method="env://", rank=found["rank"],
                            world_size=found["world_size"], timeout=TIMEOUT)
    return True


def shutdown() -> None:
    """Leave the process group: on every way out of a command (done, failed, signalled).

    A process that exits with the group still up leaves gloo's threads running while the
    interpreter tears down, and the C++ runtime aborts it ("terminate called without an
    active exception", SIGABRT) instead of letting it exit with its own status. Destroying
    the group joins them; a peer that already left makes no difference (its pairs are
    closed, nothing waits on it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_index(local_rank: int, env=None) -> int:
    """The CUDA device of the process with ``local_rank`` on its node: 0 when
    ``CUDA_VISIBLE_DEVICES`` holds one device (SLURM binds one GPU to each task with
    ``--gpus-per-task=1`` or ``--gpu-bind``, and every task sees its own as device 0);
    ``local_rank`` when the processes of a node share its devices (torchrun, or srun
    without binding)."""
    env = os.environ if env is None else env
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return 0 if len(visible) == 1 else local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    found = process_env() if is_distributed() else None
    return found["local_rank"] if found else 0


def is_main() -> bool:
    """Rank 0: the one process that writes logs, pictures, TensorBoard and checkpoints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(global_batch: int) -> slice:
    """This rank's rows of a global batch: equal, disjoint, in rank order."""
    n = world_size()
    if global_batch % n != 0:
        from ncsn.registry import ConfigError
        raise ConfigError(f"trainer.batch_size={global_batch} is the global batch and must split "
                          f"evenly over the {n} processes; use a multiple of {n}")
    size = global_batch // n
    return slice(rank() * size, (rank() + 1) * size)


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient, the sum of the ranks' gradients (the
    reduction SyncBatchNorm's statistics go through)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def global_moments(per_channel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (C,) of ``per_channel`` (C, M), over the M values
    of every rank together (equal shards): what one process holding the global batch would
    compute, up to rounding. Differentiable: the gradient of a loss through these
    statistics reaches every rank's values, as with SyncBatchNorm, so that once DDP has
    averaged the weights' gradients they are the one process's. A single process computes
    them directly."""
    if not is_distributed():
        return per_channel.mean(1), per_channel.var(1, unbiased=False)
    count = per_channel.shape[1] * world_size()
    mean = _SumOverRanks.apply(per_channel.sum(1)) / count
    var = _SumOverRanks.apply((per_channel - mean[:, None]).pow(2).sum(1)) / count
    return mean, var


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

def rank_share(n: int) -> range:
    """This rank's contiguous part of ``n`` samples: the first ``n mod N`` of N ranks draw
    one more than the others; all of them in one process."""
    size, extra = divmod(n, world_size())
    k = rank()
    start = k * size + min(k, extra)
    return range(start, start + size + (k < extra))


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` (picklable; tensors on the CPU) on rank 0, in rank order; None
    on the other ranks. One process: ``[obj]``."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def exit_code(err: BaseException) -> int:
    """The status ``ncsn-train`` exits with for ``err`` (see ``ncsn.cli.common.run_cli``)."""
    from ncsn.checkpoint import CheckpointError
    from ncsn.registry import ConfigError

    return 2 if isinstance(err, (ConfigError, CheckpointError, FileNotFoundError)) else 1


@contextmanager
def all_or_none():
    """Run a block on every rank; when it fails on any rank, it fails on all of them: the
    failing rank re-raises its own error, the others raise :class:`RankFailed` with the
    failing rank's message. One all-gather at the end of the block; use it around work that
    has no collectives inside (building a run, loading a checkpoint), so that a rank that
    fails there cannot leave the others waiting in a collective."""
    error = None
    try:
        yield
    except Exception as err:            # re-raised below, on this rank unchanged
        error = err
    if is_distributed():
        reports = [None] * world_size()
        mine = None if error is None else (str(error), exit_code(error))
        dist.all_gather_object(reports, mine)
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if failed and error is None:
            r, (message, code) = failed[0]
            raise RankFailed(f"rank {r}: {message}", code)
    if error is not None:
        raise error


FAILURE_KEY = "ncsn/first_failure"


def first_failure(err: Exception) -> Exception:
    """The error this rank should stop with after ``err`` in the training loop.

    The first rank to fail posts its message in the process group's key-value store before
    it exits; the ranks that then lose it inside a collective (gloo: "Connection closed by
    peer") read that message and stop with it (:class:`RankFailed`), so every rank ends with
    the failing rank's one line. The store lives in rank 0's process (torchrun: in its
    agent's); when it cannot be reached, rank 0 is the one that failed, and said why.
    """
    if not is_distributed():
        return err
    mine = json.dumps([rank(), str(err), exit_code(err)])
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=10))
        first = json.loads(store.compare_set(FAILURE_KEY, "", mine).decode() or mine)
    except Exception:               # the store went with rank 0
        return RankFailed(f"rank 0 stopped (its message is above); rank {rank()} lost it "
                          f"({type(err).__name__})")
    failed_rank, message, code = first
    return err if failed_rank == rank() else RankFailed(f"rank {failed_rank}: {message}", code)


class StopVote:
    """Agree on when to stop after a signal, without waiting on the network in the step.

    Each step hands this rank's signal number (0: none) to an asynchronous all-reduce (MAX,
    gloo, a CPU tensor) and reads the previous step's result: every rank sees the same vote
    at the same step, one step after the first rank's signal, and stops there.
    """

    def __init__(self):
        self.pending = None
        self.votes = torch.zeros(1, dtype=torch.int32)

    def __call__(self, signum: int | None) -> int | None:
        """The signal to stop for, the same on every rank; None: go on."""
        if not is_distributed():
            return signum
        agreed = None
        if self.pending is not None:
            self.pending.wait()
            agreed = int(self.votes.item()) or None
        self.votes = torch.tensor([signum or 0], dtype=torch.int32)
        self.pending = None
        if agreed is None:
            self.pending = dist.all_reduce(self.votes, op=dist.ReduceOp.MAX, async_op=True)
        return agreed

    def close(self) -> None:
        """Wait for the last vote, so no collective is left open when the loop ends."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


def data_parallel(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``net`` wrapped in DistributedDataParallel when distributed (it starts from rank 0's
    weights and averages the gradients over the ranks: with equal shards, the mean of the
    ranks' batch means is the global batch mean); ``net`` itself otherwise."""
    if not is_distributed():
        return net
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=device_ids)


@contextmanager
def rank_zero_clock():
    """Hydra names a run's folder after ``${now:...}``, read by each process at its own time;
    inside this block every rank reads rank 0's time, so all of them agree on one folder.
    (Hydra's resolver calls ``datetime.now()`` in ``hydra.core.utils``; it is pinned there.)"""
    if not is_distributed():
        yield
        return
    import hydra.core.utils as hydra_utils

    t0 = broadcast_object(datetime.now())

    class RankZeroDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return t0

    original = hydra_utils.datetime
    hydra_utils.datetime = RankZeroDatetime
    try:
        yield
    finally:
        hydra_utils.datetime = original
