"""What ncsn adds to Hydra's submitit SLURM launcher (``hydra/launcher=slurm``).

The launcher itself is ``hydra_plugins.ncsn_launcher.slurm.SlurmLauncher`` (Hydra takes
launchers from the ``hydra_plugins`` package only); the work is done here:

- While the multirun waits for its jobs, it says which of them pend and why, one line each
  time a job's reason is new: a job that asks for more than its partition has (SLURM's
  reason ``PartitionConfig``) would otherwise leave the multirun waiting in silence forever.
- In a job of several tasks, only rank 0 writes Hydra's files (``.hydra/``) and the run's
  log (``train.log``); the other ranks compose the same config without them.
"""
from __future__ import annotations

import logging
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Reasons that do not go away by waiting: the request itself, or the partition, must change.
NEVER = {
    "PartitionConfig": "it asks for more than its partition has (CPUs, memory, GPUs or "
                       "nodes per job)",
    "PartitionNodeLimit": "it asks for more nodes than its partition allows",
    "PartitionTimeLimit": "its time limit is longer than its partition allows",
    "BadConstraints": "no node has what it asks for",
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "InvalidAccount": "its account is not valid here",
    "InvalidQOS": "its QOS is not valid here",
}


# What ranks other than 0 add to their overrides: no .hydra/ folder, no log file.
QUIET_RANK = ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


@contextmanager
def watch_pending(folder: Path, every_s: float, params: dict):
    """Report the pending jobs of submitit's ``folder`` from a thread while the block waits
    for them; ``params``: the launcher's settings, named when a job asks for too much."""
    stop = threading.Event()
    thread = threading.Thread(target=_report_pending, args=(folder, every_s, params, stop),
                              name="ncsn-pending-jobs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def _report_pending(folder: Path, every_s: float, params: dict, stop: threading.Event) -> None:
    """Every ``every_s`` seconds until ``stop``: one line for each job whose pending reason
    is new since the last look."""
    said: dict[str, str] = {}
    while not stop.wait(every_s):
        for job, reason in pending_jobs(_job_ids(folder)).items():
            if said.get(job) != reason:
                said[job] = reason
                _say(job, reason, params)


def _job_ids(folder: Path) -> list[str]:
    """The SLURM jobs submitit made in ``folder``: its subfolders are named after them
    (``ID``, or ``ARRAY_TASK`` for the tasks of an array; the array's id finds them all)."""
    if not folder.is_dir():
        return []
    return sorted({p.name.split("_")[0] for p in folder.iterdir()
                   if p.is_dir() and p.name.split("_")[0].isdigit()})


def pending_jobs(job_ids: list[str]) -> dict[str, str]:
    """``{job: SLURM's reason}`` for the pending ones among ``job_ids`` (array tasks one by
    one, as ``ID_TASK``); empty when squeue cannot say."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "PENDING", "-o", "%i|%r",
                              "-j", ",".join(job_ids)], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def _say(job: str, reason: str, params: dict) -> None:
    """One line about a pending job: why, and what to change when waiting will not help."""
    if reason not in NEVER:
        log.info("SLURM job %s is pending (%s)", job, reason)
        return
    asked = ", ".join(f"{key}={params.get(key)}" for key in
                      ("partition", "nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node",
                       "mem_gb", "timeout_min") if params.get(key) is not None)
    log.warning("SLURM job %s is pending (%s): %s, and will not start as it is (%s); "
                "scancel it and set hydra.launcher.* within what `sinfo -N -l` shows",
                job, reason, NEVER[reason], asked)
