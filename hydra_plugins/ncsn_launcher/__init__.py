"""ncsn's Hydra launcher: see :mod:`hydra_plugins.ncsn_launcher.slurm`."""
