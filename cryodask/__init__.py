"""cryodask: cryo-EM single-particle refinement as Dask task graphs.

Reads and writes RELION's files and takes RELION's option names, so that a
RELION command line translates word for word. The jobs are importable here:
``cryodask.refine3d(...)``, ``cryodask.class3d(...)``, ``cryodask.class2d(...)``, and
``cryodask.open_run(path)`` opens a finished or running job (ours or RELION's).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from cryodask.errors import UserError as UserError

# jobs load NumPy, pandas and dask: import them on first use so `import cryodask` and `cryodask --help` stay light
_JOBS = {"refine3d": "cryodask.em.refine3d", "class3d": "cryodask.em.class3d", "class2d": "cryodask.em.class2d",
         "open_run": "cryodask.runs"}

__all__ = ["UserError", "__version__", *_JOBS]


def __getattr__(name: str) -> Any:
    if name in _JOBS:
        import importlib

        return getattr(importlib.import_module(_JOBS[name]), name)
    raise AttributeError(f"module 'cryodask' has no attribute {name!r}")
