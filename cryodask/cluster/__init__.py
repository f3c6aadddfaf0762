"""Where the work runs: local and SLURM clusters, GPU assignment, node-local scratch.

Jobs get their client from :func:`execution_client` (options from :func:`add_execution_args`);
GPU tasks ask for ``resources=gpu_task_resources(client)``.
"""

from cryodask.cluster.client import add_execution_args, execution_client
from cryodask.cluster.gpu import assign_gpus, gpu_task_resources, substitute_gpu

__all__ = ["add_execution_args", "assign_gpus", "execution_client", "gpu_task_resources", "substitute_gpu"]
