"""Where the work runs: local and SLURM clusters, GPU assignment, node-local scratch."""
