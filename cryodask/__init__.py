"""cryodask: cryo-EM single-particle refinement as Dask task graphs.

Reads and writes RELION's files and takes RELION's option names, so that a
RELION command line translates word for word.
"""

from __future__ import annotations

__version__ = "0.1.0"

from cryodask.errors import UserError as UserError
from cryodask.em.refine3d import refine3d as refine3d
