"""``cryodask import`` through the command line: the summary, and one clean error line for bad input."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryodask.cli import main
from cryodask.io.store import open_store


def _stack(path: Path, data: np.ndarray, angpix: float) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data.astype(np.float32))
        m.set_image_stack()
        m.voxel_size = angpix


def make_project(folder: Path, *, n: int = 40, boxes=(32,), angpixes=(1.5,), seed: int = 0) -> Path:
    """One stack per optics group (n particles each); returns the STAR file (RELION 3.1 layout)."""
    rng = np.random.default_rng(seed)
    (folder / "Extract").mkdir(parents=True, exist_ok=True)
    optics, rows = [], []
    for g, (box, angpix) in enumerate(zip(boxes, angpixes), start=1):
        _stack(folder / f"Extract/g{g}.mrcs", rng.normal(size=(n, box, box)), angpix)
        optics.append({"rlnOpticsGroupName": f"opticsGroup{g}", "rlnOpticsGroup": g, "rlnVoltage": 300.0,
                       "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1, "rlnImagePixelSize": angpix,
                       "rlnImageSize": box, "rlnImageDimensionality": 2})
        rows += [{"rlnImageName": f"{k + 1:06d}@Extract/g{g}.mrcs", "rlnDefocusU": 15000.0 + k,
                  "rlnOriginXAngst": 0.5, "rlnOriginYAngst": -0.5, "rlnOpticsGroup": g} for k in range(n)]
    star = folder / "particles.star"
    starfile.write({"optics": pd.DataFrame(optics), "particles": pd.DataFrame(rows)}, star)
    return star


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_project(tmp_path)


def test_import_prints_a_summary(project, tmp_path, capsys):
    assert main(["import", "--i", str(project), "--o", "p.zarr", "--chunk", "16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    line = out[0]
    for word in ("40 particles", "box 32", "pixel size 1.5 Å", "float32", "3 chunks of 16", "on disk", " s"):
        assert word in line, line
    s = open_store(tmp_path / "p.zarr")
    assert (len(s), s.box, s.chunk) == (40, 32, 16)


def test_import_new_box_float16_prints_pixel_size_and_resolution(project, tmp_path, capsys):
    assert main(["import", "--i", str(project), "--o", "q.zarr", "--new_box", "24", "--float16"]) == 0
    out = capsys.readouterr().out
    assert "box 32 -> 24: pixel size 1.5 -> 2 Å" in out
    assert "best reachable resolution 4 Å" in out
    assert "float16" in out
    s = open_store(tmp_path / "q.zarr")
    assert (s.box, s.pixel_size, s.dtype) == (24, 2.0, np.float16)
    assert s.table.optics["rlnImageSize"].tolist() == [24]


def _missing_stack(d: Path) -> list[str]:
    (d / "Extract/g1.mrcs").unlink()
    return []


def _truncated_stack(d: Path) -> list[str]:
    f = d / "Extract/g1.mrcs"
    f.write_bytes(f.read_bytes()[:-5000])
    return []


def _nan_image(d: Path) -> list[str]:
    with mrcfile.open(d / "Extract/g1.mrcs", mode="r+") as m:
        m.data[30, 1, 2] = np.nan
    return []


def _mixed_box(d: Path) -> list[str]:
    make_project(d, boxes=(32, 64), angpixes=(1.5, 1.5))
    return []


def _mixed_pixel(d: Path) -> list[str]:
    make_project(d, boxes=(32, 32), angpixes=(1.5, 1.2))
    return []


def _odd_box(d: Path) -> list[str]:
    make_project(d, boxes=(33,))
    return []


def _empty_loop(d: Path) -> list[str]:
    (d / "particles.star").write_text(
        "# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
        "_rlnImagePixelSize #3\n_rlnImageSize #4\n_rlnImageDimensionality #5\nopticsGroup1 1 1.5 32 2\n\n"
        "# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n\n")
    return []


def _existing_output(d: Path) -> list[str]:
    (d / "out.zarr").mkdir()
    (d / "out.zarr" / "mine.txt").write_text("keep")
    return []


BAD = {
    "missing stack": (_missing_stack, [], r"g1\.mrcs.*not found"),
    "truncated stack": (_truncated_stack, [], r"truncated"),
    "NaN image": (_nan_image, [], r"row 31.*NaN"),
    "mixed box sizes": (_mixed_box, [], r"box|size"),
    "mixed pixel sizes": (_mixed_pixel, [], r"pixel size"),
    "odd box": (_odd_box, [], r"odd"),
    "empty particles loop": (_empty_loop, [], r"particles loop (is empty|has no rows)"),
    "existing output": (_existing_output, [], r"already exists.*--overwrite"),
    "odd new box": (lambda d: [], ["--new_box", "15"], r"--new_box.*even"),
    "new box too large": (lambda d: [], ["--new_box", "32"], r"--new_box.*below"),
    "new box larger": (lambda d: [], ["--new_box", "64"], r"--new_box.*below"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_error_line_and_nothing_written(case, project, tmp_path, capsys):
    spoil, extra, pattern = BAD[case]
    spoil(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["import", "--i", "particles.star", "--o", "out.zarr", "--chunk", "8", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryodask: error: "), err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0], flags=re.I), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no *.tmp-* left behind
    if case == "existing output":
        assert (tmp_path / "out.zarr" / "mine.txt").read_text() == "keep"
    else:
        assert not (tmp_path / "out.zarr").exists()
