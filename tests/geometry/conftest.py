"""A tiny relion_refine runner for sampling parity tests (one noise particle, 16 px)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

BOX, APIX = 16, 5.0


def _write_dataset(folder: Path) -> None:
    import mrcfile

    rng = np.random.default_rng(0)
    with mrcfile.new(folder / "ref.mrc", overwrite=True) as m:
        m.set_data(rng.normal(size=(BOX, BOX, BOX)).astype(np.float32))
        m.voxel_size = APIX
    with mrcfile.new(folder / "stack.mrcs", overwrite=True) as m:
        m.set_data(rng.normal(size=(1, BOX, BOX)).astype(np.float32))
        m.voxel_size = APIX
    (folder / "particles.star").write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnImagePixelSize\n_rlnImageSize\n"
        "_rlnImageDimensionality\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
        f"1 og1 {APIX} {BOX} 2 300 2.7 0.1\n\n"
        "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n"
        "_rlnOriginXAngst\n_rlnOriginYAngst\n1@stack.mrcs 1 0 0 0 0 0\n"
    )


@pytest.fixture(scope="session")
def relion_sampling(relion, tmp_path_factory):
    """``run(name, healpix_order=..., sym=..., ...) -> (stdout, output root)``.

    One 3D-classification iteration of ``relion_refine`` on a single noise particle;
    the outputs ``<root>_it001_sampling.star`` / ``_data.star`` hold RELION's
    directions, perturbation instance and chosen pose. ``extra`` adds options that
    are not set here (e.g. ``--limit_tilt``).
    """
    folder = tmp_path_factory.mktemp("relion_sampling")
    _write_dataset(folder)

    def run(name: str, *, healpix_order: int, sym: str = "C1", oversampling: int = 0,
            offset_range: float = 0, offset_step: float = 1, extra: tuple[str, ...] = ()) -> tuple[str, Path]:
        (folder / "out").mkdir(exist_ok=True)
        out = folder / "out" / name
        cmd = [
            str(relion / "relion_refine"), "--i", "particles.star", "--o", f"out/{name}", "--ref", "ref.mrc",
            "--healpix_order", str(healpix_order), "--sym", sym, "--iter", "1", "--K", "1",
            "--particle_diameter", "70", "--ini_high", "30", "--offset_range", str(offset_range),
            "--offset_step", str(offset_step), "--oversampling", str(oversampling), "--j", "1",
            "--pad", "1", "--firstiter_cc", "--dont_check_norm", *extra,
        ]
        res = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        return res.stdout, out

    return run
