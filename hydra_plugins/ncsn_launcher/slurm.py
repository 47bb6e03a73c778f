"""``hydra/launcher=slurm``: the submitit plugin's SLURM launcher with ncsn's additions
(:mod:`ncsn.launcher`): the waiting multirun says which jobs pend and why, and only rank 0
of a job writes ``.hydra/`` and ``train.log``.

Hydra instantiates launchers from the ``hydra_plugins`` package only, hence this module. It
defines nothing where hydra-submitit-launcher is not installed (``pip install
"ncsn[slurm]"``), so that Hydra's scan of its plugins stays quiet there. (No ``from
__future__ import annotations``: Hydra's scan runs this module before it is in
``sys.modules``, where a dataclass cannot resolve string annotations.)
"""
from dataclasses import dataclass
from pathlib import Path

try:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import \
        SlurmLauncher as SubmititSlurmLauncher
except ImportError:
    SubmititSlurmLauncher = None

if SubmititSlurmLauncher is not None:
    from hydra.core.config_store import ConfigStore

    from ncsn.launcher import QUIET_RANK, watch_pending

    @dataclass
    class NcsnSlurmQueueConf(SlurmQueueConf):
        """The submitit plugin's SLURM settings and ``watch_every_s``."""

        _target_: str = "hydra_plugins.ncsn_launcher.slurm.SlurmLauncher"
        watch_every_s: float = 30.0   # how often the waiting multirun asks squeue what pends

    class SlurmLauncher(SubmititSlurmLauncher):
        """The submitit plugin's SLURM launcher, with ncsn's additions."""

        def __init__(self, watch_every_s: float = 30.0, **params) -> None:
            super().__init__(**params)
            self.watch_every_s = watch_every_s

        def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
            """One task of a job, in the job: ranks other than 0 write no Hydra files."""
            import submitit

            if submitit.JobEnvironment().global_rank != 0:
                sweep_overrides = [*sweep_overrides, *QUIET_RANK]
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id,
                                    singleton_state)

        def launch(self, job_overrides, initial_job_idx):
            """Submit the jobs and wait for them, saying which pend and why meanwhile."""
            folder = Path(self.params["submitit_folder"]).parent   # .../.submitit/%j
            with watch_pending(folder, self.watch_every_s, self.params):
                return super().launch(job_overrides, initial_job_idx)

    # configs/hydra/launcher/slurm.yaml starts from this schema.
    ConfigStore.instance().store(group="hydra/launcher", name="ncsn_slurm_schema",
                                 node=NcsnSlurmQueueConf, provider="ncsn")
