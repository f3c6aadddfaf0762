"""Open a finished or running job: cryodask's own or RELION's Refine3D / Class3D / Class2D output.

:func:`open_run` finds a run's files from a folder, a rootname or any of its iteration
files, and gives a :class:`Run`: what kind of job it is, the last iteration written, the
resolution and FSC, the class fractions, the maps (read when first asked for), the
particles as a DataFrame and the numbers of every iteration read back from its files
(:attr:`Run.history`). Nothing is cached between calls of :func:`open_run`, so calling it
again on a running job shows the newest iteration.

Examples
--------
>>> import cryodask
>>> run = cryodask.open_run("Refine3D/job012/")               # doctest: +SKIP
>>> run.kind, run.iteration, run.resolution                    # doctest: +SKIP
('refine3d', 14, 3.42)
>>> run.plot_fsc()                                              # doctest: +SKIP
>>> run.write_report()                                          # doctest: +SKIP
PosixPath('Refine3D/job012/run_report.html')
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cryodask.errors import UserError

__all__ = ["open_run", "Run", "RunViews", "find_root"]

_IT_FILE = re.compile(r"^(?P<root>.+)_it(?P<it>\d{3,})_(?P<what>optimiser\.star|model\.star|half1_model\.star|"
                      r"data\.star|sampling\.star)$")


def _iterations(root: Path) -> list[int]:
    """Iterations with an ``_optimiser.star`` (written last by cryodask and RELION, so the iteration is complete)."""
    out = []
    for p in root.parent.glob(f"{glob_escape(root.name)}_it*_optimiser.star"):
        m = _IT_FILE.match(p.name)
        if m and m.group("root") == root.name:
            out.append(int(m.group("it")))
    return sorted(out)


def glob_escape(s: str) -> str:
    import glob

    return glob.escape(s)


def find_root(path: str | os.PathLike[str]) -> tuple[Path, int | None]:
    """(rootname, iteration named by ``path`` or None) of a job's outputs.

    ``path`` may be a job folder (``Refine3D/job012``: the rootname whose newest
    ``_itNNN_optimiser.star`` is the most recent; RELION's ``run``, ``run_ct5``…), a rootname
    (``Refine3D/run``), or any of the run's files (``run_it025_optimiser.star``, ``run_model.star``…).
    """
    p = Path(path)
    if p.is_dir():
        roots: dict[str, float] = {}
        for f in p.glob("*_it*_optimiser.star"):
            m = _IT_FILE.match(f.name)
            if m:
                roots[m.group("root")] = max(roots.get(m.group("root"), 0.0), f.stat().st_mtime)
        if not roots:
            raise UserError(p, "holds no <root>_itNNN_optimiser.star; give a Refine3D, Class3D or Class2D job folder "
                               "(or a rootname such as Class2D/job005/run)")
        return p / max(roots, key=lambda r: (roots[r], r)), None
    if p.is_file() or p.suffix in (".star", ".mrc", ".mrcs"):
        m = _IT_FILE.match(p.name)
        if m:
            return p.with_name(m.group("root")), int(m.group("it"))
        m = re.match(r"^(?P<root>.+?)_(model|data|optimiser|sampling|class\d{3}|half[12]_class\d{3}_unfil)"
                     r"\.(star|mrc)$", p.name)
        if m:
            return p.with_name(m.group("root")), None
        if not p.exists():
            raise UserError(p, "does not exist; give a job folder, a rootname or one of the run's files")
        raise UserError(p, "is not a file of a Refine3D, Class3D or Class2D run (<root>_itNNN_optimiser.star, "
                           "<root>_model.star…); give the job folder or the rootname")
    if _iterations(p) or p.with_name(p.name + "_model.star").is_file():
        return p, None
    raise UserError(p, f"no run found: neither a folder nor a rootname with {p.name}_itNNN_optimiser.star files "
                       f"in {p.parent}; give the job folder (e.g. Class2D/job005) or its rootname (Class2D/job005/run)")


def _pairs(path: Path, block: str) -> dict[str, Any]:
    from cryodask.io.star import read_star

    try:
        blocks = read_star(path, blocks=[block])
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(path, f"cannot be read ({exc}); give a STAR file written by cryodask or RELION") from None
    b = blocks.get(block)
    if b is None:
        return {}
    return b if isinstance(b, dict) else dict(b.attrs.get("pairs", {}))


def _resolve(name: str, beside: Path) -> Path | None:
    """A file named inside a run's STAR file: as written (relative to the working folder), else beside ``beside``."""
    if not name or name == "None":
        return None
    p = Path(name)
    if p.is_file():
        return p
    q = beside.parent / p.name
    return q if q.is_file() else None


def _float(v: Any, default: float = float("nan")) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


class RunViews:
    """Plots and a report for any object with an ``output_root`` (a job's result, or a :class:`Run`).

    Each plot re-reads the run's files through :func:`open_run`, so a result object shows what
    was written, and a :class:`Run` of a running job shows its last finished iteration.
    """

    output_root: Any

    def _open(self) -> "Run":
        return self if isinstance(self, Run) else open_run(self.output_root)

    def plot_fsc(self, ax: Any = None) -> Any:
        """FSC curve with the 0.143 and 0.5 lines (:func:`cryodask.plots.plot_fsc`); refine3d runs."""
        from cryodask.plots import plot_fsc

        run = self._open()
        if run.fsc is None:
            raise UserError(run.root, f"a {run.kind} run has no gold-standard FSC; plot_fsc is for refine3d runs")
        return plot_fsc(run.fsc, run.pixel_size, run.box, ax=ax, label=None)

    def plot_classes(self, *, order: str = "class") -> Any:
        """Class averages (class2d: montage labelled with fractions and resolutions) or map slices (3D)."""
        from cryodask.plots import plot_class_montage, plot_map_slices

        run = self._open()
        if run.kind == "class2d":
            return plot_class_montage(run.maps, class_fractions=run.class_fractions,
                                      resolutions=run.class_resolutions, order=order,
                                      title=f"{run.root.name} iteration {run.iteration}")
        labels = [f"class {k + 1}" + (f" {100 * f:.0f}%" if run.kind == "class3d" else "")
                  for k, f in enumerate(run.class_fractions)]
        return plot_map_slices(run.maps, labels=labels[: len(run.maps)],
                               title=f"{run.root.name} {'final' if run.finished else f'iteration {run.iteration}'}")

    def plot_slices(self) -> Any:
        """Central slices and projections of the 3D maps (:func:`cryodask.plots.plot_map_slices`)."""
        return self.plot_classes()

    def plot_angles(self, ax: Any = None) -> Any:
        """Viewing directions over the sphere (rlnAngleRot, rlnAngleTilt of the particles)."""
        from cryodask.plots import plot_angular_distribution

        run = self._open()
        p = run.particles
        if "rlnAngleTilt" not in p.columns:
            raise UserError(run.data_path, "has no rlnAngleRot/rlnAngleTilt (a 2D run); plot_angles is for 3D runs")
        return plot_angular_distribution(p["rlnAngleRot"].to_numpy(), p["rlnAngleTilt"].to_numpy(), ax=ax,
                                         title=f"{len(p)} particles")

    def plot_convergence(self) -> Any:
        """Resolution, class fractions, changes and Pmax per iteration (:func:`cryodask.plots.plot_convergence`)."""
        from cryodask.plots import plot_convergence

        run = self._open()
        return plot_convergence(run.history, title=f"{run.kind} {run.root.name}")

    def write_report(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write ``run_report.html`` and its PNGs (:func:`cryodask.report.write_report`); returns the HTML's path."""
        from cryodask.report import write_report

        return write_report(self._open(), path)

    report = write_report


@dataclass(eq=False)
class Run(RunViews):
    """A job's outputs as written on disk (see :func:`open_run`).

    Attributes
    ----------
    root
        Output rootname (``Refine3D/job012/run``); ``output_root`` is its string.
    kind
        ``"refine3d"``, ``"class3d"`` or ``"class2d"``.
    iteration
        Last iteration whose ``_optimiser.star`` is written (0: initialised only).
    finished
        The final files of a refine3d run (``<root>_model.star``, ``<root>_class001.mrc``) exist;
        for classifications, the last iteration is the number asked for.
    """

    root: Path
    kind: str
    iteration: int
    finished: bool
    optimiser_path: Path | None
    model_path: Path
    data_path: Path
    optimiser: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def output_root(self) -> str:
        return str(self.root)

    # -- model --------------------------------------------------------------------------------
    @cached_property
    def model(self) -> Any:
        """The :class:`cryodask.em.model.Model` of the last iteration (the final one when finished)."""
        from cryodask.em.model import read_model

        return read_model(self.model_path)

    @property
    def pixel_size(self) -> float:
        return float(self.model.pixel_size)

    @property
    def box(self) -> int:
        return int(self.model.ori_size)

    @property
    def fsc(self) -> np.ndarray | None:
        """Gold-standard FSC per shell (refine3d), else None."""
        if self.kind != "refine3d":
            return None
        f = np.asarray(self.model.fsc[0], np.float64)
        return f if np.any(f != 0) else None

    @property
    def resolution(self) -> float:
        """Å: refine3d, where the gold-standard FSC drops below 0.143 (RELION's rule); else ``rlnCurrentResolution``."""
        if self.fsc is not None:
            from cryodask.analysis.fsc import resolution_at

            return resolution_at(self.fsc, 0.143, self.pixel_size, self.box)
        return float(self.model.current_resolution)

    @property
    def class_fractions(self) -> np.ndarray:
        """``rlnClassDistribution`` per class."""
        return np.asarray(self.model.class_fractions, np.float64)

    @property
    def class_resolutions(self) -> np.ndarray:
        """``rlnEstimatedResolution`` per class (Å)."""
        return np.asarray(self.model.estimated_resolution, np.float64)

    # -- files --------------------------------------------------------------------------------
    @property
    def map_paths(self) -> list[Path]:
        """The maps of the last iteration (class2d: the one ``_classes.mrcs`` stack; refine3d, finished: the joined
        map; refine3d, running: the half-1 map)."""
        if self.kind == "refine3d" and self.finished:
            p = Path(f"{self.root}_class001.mrc")
            if p.is_file():
                return [p]
        out: list[Path] = []
        for ref in self.model.references:
            name = ref.split("@", 1)[1] if "@" in ref else ref
            p = _resolve(name, self.model_path)
            if p is not None and p not in out:
                out.append(p)
        if out:
            return out
        it = f"{self.root}_it{self.iteration:03d}"
        guess = {"class2d": [f"{it}_classes.mrcs"], "refine3d": [f"{it}_half1_class001.mrc"],
                 "class3d": [f"{it}_class{k + 1:03d}.mrc" for k in range(self.model.n_classes)]}[self.kind]
        return [Path(g) for g in guess if Path(g).is_file()]

    @cached_property
    def maps(self) -> np.ndarray | list[np.ndarray]:
        """class2d: the class averages ``(K, B, B)``; 3D: a list of maps ``(N, N, N)``. Read on first access."""
        from cryodask.io.mrc import read_map, read_stack

        paths = self.map_paths
        if not paths:
            raise UserError(self.model_path, "names no map that exists (rlnReferenceImage); were the maps moved?")
        if self.kind == "class2d":
            return np.array(read_stack(paths[0], mmap=False))
        return [read_map(p)[0] for p in paths]

    @cached_property
    def particles(self) -> Any:
        """The particles of the last iteration (``_data.star``) as a DataFrame (origins in Å)."""
        from cryodask.io.star import read_particles

        return read_particles(self.data_path).particles

    @property
    def command_line(self) -> str:
        if self.optimiser_path is None:
            return ""
        from cryodask.em.state import command_line_of

        return command_line_of(self.optimiser_path)

    @cached_property
    def history(self) -> Any:
        """One row per iteration (from 1) read back from the iteration files (a DataFrame).

        Columns: ``iteration``, ``resolution`` (``rlnCurrentResolution``, Å), ``gold_resolution``
        (refine3d: FSC 0.143 of the half-set model), ``class_fractions`` (array per row),
        ``ave_pmax``, ``log_likelihood``, ``acc_rot`` (°), ``acc_trans`` (Å), ``changes_orientations``
        (°), ``changes_offsets`` (Å), ``changes_classes``, ``healpix_order``, ``current_size``.
        """
        import pandas as pd

        from cryodask.analysis.fsc import resolution_at
        from cryodask.em.model import read_model

        rows = []
        for it in _iterations(self.root):
            if it < 1 or it > self.iteration:
                continue
            stem = f"{self.root}_it{it:03d}"
            opt = _pairs(Path(f"{stem}_optimiser.star"), "optimiser_general")
            mpath = Path(f"{stem}_half1_model.star" if self.kind == "refine3d" else f"{stem}_model.star")
            if not mpath.is_file():
                continue
            m = read_model(mpath)
            row: dict[str, Any] = dict(
                iteration=it, resolution=float(m.current_resolution), class_fractions=m.class_fractions.copy(),
                ave_pmax=float(m.ave_pmax), log_likelihood=float(m.log_likelihood),
                acc_rot=_float(opt.get("rlnOverallAccuracyRotations", m.acc_rot[0])),
                acc_trans=_float(opt.get("rlnOverallAccuracyTranslationsAngst",
                                         opt.get("rlnOverallAccuracyTranslations", m.acc_trans[0]))),
                changes_orientations=_float(opt.get("rlnChangesOptimalOrientations")),
                changes_offsets=_float(opt.get("rlnChangesOptimalOffsets")),
                changes_classes=_float(opt.get("rlnChangesOptimalClasses")),
                current_size=int(m.current_size))
            if self.kind == "refine3d" and np.any(m.fsc[0] != 0):
                row["gold_resolution"] = resolution_at(m.fsc[0], 0.143, m.pixel_size, m.ori_size)
            samp = Path(f"{stem}_sampling.star")
            if samp.is_file():
                row["healpix_order"] = _float(_pairs(samp, "sampling_general").get("rlnHealpixOrder"))
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        state = "finished" if self.finished else f"iteration {self.iteration}"
        try:
            res = f", {self.resolution:.2f} Å"
        except UserError:
            res = ""
        return f"Run({self.kind} {self.root}, {state}{res})"


def _kind(root: Path, model: Path, optimiser: dict[str, Any]) -> str:
    general = _pairs(model, "model_general")
    if int(_float(general.get("rlnReferenceDimensionality", 3), 3)) == 2:
        return "class2d"
    auto = optimiser.get("rlnDoAutoRefine")
    if (auto is not None and int(_float(auto, 0))) or model.name.endswith("_half1_model.star") or \
            "_half1_model.star" in str(optimiser.get("rlnModelStarFile", "")):
        return "refine3d"
    return "class3d"


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open a job's outputs: a folder, a rootname or a file of a cryodask or RELION Refine3D/Class3D/Class2D run.

    Parameters
    ----------
    path
        ``Refine3D/job012`` (a folder: its most recently written rootname), ``Refine3D/job012/run``
        (a rootname), or one of the run's files; an ``_itNNN_optimiser.star`` opens that iteration
        instead of the last one.

    Returns
    -------
    Run

    Raises
    ------
    UserError
        No run there, or its files are not a run's.
    """
    root, it = find_root(path)
    its = _iterations(root)
    final_model = Path(f"{root}_model.star")
    if it is None and not its and not final_model.is_file():
        raise UserError(root, "has no _itNNN_optimiser.star files; is this the rootname of a run?")
    if it is not None and it not in its:
        raise UserError(f"{root}_it{it:03d}_optimiser.star", "does not exist; give an iteration that was written")
    last = it if it is not None else (its[-1] if its else 0)
    opt_path = Path(f"{root}_it{last:03d}_optimiser.star") if its else None
    optimiser = _pairs(opt_path, "optimiser_general") if opt_path is not None else {}
    # the final files of an auto-refine (<root>_model.star, written after its last iteration)
    finished = it is None and final_model.is_file() and (
        opt_path is None or final_model.stat().st_mtime >= opt_path.stat().st_mtime - 1)
    if finished:
        model, data = final_model, Path(f"{root}_data.star")
    else:
        stem = f"{root}_it{last:03d}"
        model = Path(f"{stem}_model.star")
        if not model.is_file():
            named = str(optimiser.get("rlnModelStarFile", "")).split()
            model = next((q for q in (_resolve(n, opt_path) for n in named) if q is not None),
                         Path(f"{stem}_half1_model.star"))
        data = _resolve(str(optimiser.get("rlnExperimentalDataStarFile", "")), opt_path) or Path(f"{stem}_data.star")
    if not model.is_file():
        raise UserError(model, "does not exist; the run's iteration is incomplete (or its files were moved)")
    kind = _kind(root, model, optimiser)
    if kind != "refine3d" and its:
        n = optimiser.get("rlnNumberOfIterations")
        finished = last == its[-1] and n is not None and last >= int(_float(n, 1e9))
    if kind == "refine3d" and finished and not data.is_file():
        data = Path(f"{root}_it{last:03d}_data.star")
    return Run(root=root, kind=kind, iteration=last, finished=bool(finished), optimiser_path=opt_path,
               model_path=model, data_path=data, optimiser=optimiser)

