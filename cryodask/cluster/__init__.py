"""Where the work runs: local and SLURM clusters, GPU assignment, node-local scratch."""

from cryodask.cluster.client import add_execution_args, execution_client
from cryodask.cluster.gpu import assign_gpus, substitute_gpu

__all__ = ["add_execution_args", "assign_gpus", "execution_client", "substitute_gpu"]
