"""The notebooks in notebooks/ run top to bottom (nbclient, this interpreter's kernel), and are kept without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec for this interpreter (the venv's), found first on JUPYTER_PATH: works on a fresh clone where
    only .venv exists and no kernel was ever installed."""
    name = "cryodask-test-python"
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cryodask test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return name


def test_notebooks_are_there_and_stripped():
    import nbformat

    assert [p.name for p in NOTEBOOKS] == ["01-quickstart.ipynb", "02-classification.ipynb", "03-cluster.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (path.name, cell.source[:40])


def test_generator_writes_the_committed_notebooks(tmp_path, monkeypatch):
    """notebooks/make_notebooks.py is the source: regenerating gives the committed files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "notebooks" / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "HERE", tmp_path)
    mod.main()
    for path in NOTEBOOKS:
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(run_dir)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= {"01-quickstart": 4, "02-classification": 2, "03-cluster": 1}[path.stem]
    assert (run_dir / "work").is_dir()
    if path.stem == "01-quickstart":
        assert (run_dir / "work" / "Refine3D" / "run_report.html").is_file()
    if path.stem == "02-classification":
        import inspect

        import cryodask

        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                       if o.output_type == "stream")
        if "skip_align" in inspect.signature(cryodask.class3d).parameters:  # the focused classification ran
            assert (run_dir / "work" / "Focused" / "run_it001_model.star").is_file()
        else:
            assert "not in this version of cryodask yet" in text
