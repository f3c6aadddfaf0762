"""Shared fixtures: paths to the real RELION data in ../shared/data, RELION's tools, small phantoms."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real RELION files); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def relion() -> Path:
    """Folder holding RELION 3.1's command-line tools.

    In CI RELION must be installed (scripts/install-system-deps.sh does it), so a
    missing RELION fails there instead of skipping.
    """
    exe = shutil.which("relion_project")
    if exe is None:
        if IN_CI:
            pytest.fail("RELION is not installed: scripts/install-system-deps.sh should have installed it")
        pytest.skip("RELION is not installed (run scripts/install-system-deps.sh)")
    return Path(exe).parent


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
