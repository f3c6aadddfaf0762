"""A run's pictures as PNG files beside its outputs, and one self-contained ``<root>_report.html``.

:func:`write_report` gathers, for a finished or running job (cryodask's or RELION's), the
FSC curve (refine3d), the class averages (class2d montage) or central slices and projections
of the maps (3D), the angular distribution (3D), the convergence per iteration and a table
of the numbers; the HTML embeds the PNGs (base64), so it can be mailed or opened anywhere.

:func:`write_iteration_plots` is the cheap per-iteration hook for the jobs: one or two small
PNGs named after the iteration, next to its files.

Every file is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from cryodask.errors import UserError

__all__ = ["write_report", "write_iteration_plots", "report_paths"]


def report_paths(root: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """(HTML path, prefix of the PNG paths) for rootname ``root``.

    ``out`` None: ``<root>_report.html`` and ``<root>_<plot>.png`` beside the outputs
    (``Refine3D/job012/run_report.html``). ``out`` ending in ``.html``: that file, PNGs beside it
    named after its stem. Otherwise ``out`` is a folder: ``out/<name>_report.html``.
    """
    root = Path(root)
    if out is None:
        return Path(f"{root}_report.html"), str(root)
    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):
        stem = out.name[: -len(out.suffix)]
        stem = stem[: -len("_report")] if stem.endswith("_report") else stem
        return out, str(out.with_name(stem))
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{root.name}_report.html", str(out / root.name)


def _png(fig: Any, path: Path, dpi: int) -> bytes:
    from cryodask.io.atomic import atomic_path

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return data


def _figures(run: Any) -> list[tuple[str, str, Any]]:
    """(name, caption, figure) of the plots that apply to ``run``; a plot that cannot be made is skipped."""
    out: list[tuple[str, str, Any]] = []
    if run.fsc is not None:
        out.append(("fsc", f"Gold-standard FSC; resolution {run.resolution:.2f} Å at FSC 0.143", run.plot_fsc()))
    if run.kind == "class2d":
        out.append(("classes", "Class averages (class number, share of particles, estimated resolution)",
                    run.plot_classes(order="fraction")))
    else:
        out.append(("slices", "Central slices and projections of the map" + ("s" if len(run.map_paths) > 1 else ""),
                    run.plot_classes()))
        try:
            out.append(("angles", "Viewing directions (equal-area cells; Mollweide projection)", run.plot_angles()))
        except (UserError, OSError, KeyError):
            pass  # no _data.star yet, or no angles in it
    if len(run.history):
        out.append(("convergence", "Per iteration, read back from the iteration files", run.plot_convergence()))
    return out


def _numbers(run: Any) -> list[tuple[str, str]]:
    rows = [("job", run.kind), ("rootname", str(run.root)),
            ("state", "finished" if run.finished else f"iteration {run.iteration}"),
            ("box", f"{run.box} px, {run.pixel_size:g} Å/px"), ("resolution", f"{run.resolution:.2f} Å")]
    try:
        rows.append(("particles", f"{len(run.particles):,}"))
    except (UserError, OSError):
        pass
    if len(run.class_fractions) > 1:
        fr = ", ".join(f"{k + 1}: {100 * f:.1f}%" for k, f in enumerate(run.class_fractions))
        rows.append(("class fractions", fr))
    if run.command_line:
        rows.append(("command", run.command_line))
    return rows


def write_report(run_or_path: Any, out: str | os.PathLike[str] | None = None, *, dpi: int = 100) -> Path:
    """Write the run's PNGs and a self-contained HTML report; return the HTML's path.

    Parameters
    ----------
    run_or_path
        A :class:`cryodask.runs.Run`, an object with an ``output_root`` (a job's result), or anything
        :func:`cryodask.runs.open_run` accepts (folder, rootname, file).
    out
        Where to write (see :func:`report_paths`); default ``<root>_report.html`` beside the outputs,
        with ``<root>_fsc.png``, ``_classes.png`` / ``_slices.png``, ``_angles.png``, ``_convergence.png``.

    Returns
    -------
    pathlib.Path
    """
    from cryodask.io.atomic import atomic_path
    from cryodask.runs import Run, open_run

    if isinstance(run_or_path, Run):
        run = run_or_path
    elif hasattr(run_or_path, "output_root"):
        run = open_run(run_or_path.output_root)
    else:
        run = open_run(run_or_path)
    html_path, prefix = report_paths(run.root, out)
    sections = []
    for name, caption, fig in _figures(run):
        png = Path(f"{prefix}_{name}.png")
        data = _png(fig, png, dpi)
        b64 = base64.b64encode(data).decode("ascii")
        sections.append(f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,{b64}">'
                        f"<figcaption>{html.escape(caption)} <a href=\"{html.escape(png.name)}\">{png.name}</a>"
                        "</figcaption></figure>")
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _numbers(run))
    title = f"cryodask {run.kind}: {run.root}"
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}}
table{{border-collapse:collapse}}th,td{{text-align:left;padding:2px 10px;border-bottom:1px solid #ddd;vertical-align:top}}
td{{font-family:monospace;word-break:break-all}}img{{max-width:100%}}figure{{margin:1.5em 0}}
figcaption{{font-size:90%;color:#555}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table>{table}</table>
{''.join(sections)}
</body></html>
"""
    with atomic_path(html_path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return html_path


def write_iteration_plots(root: str | os.PathLike[str], iteration: int, kind: str, *, dpi: int = 80) -> list[Path]:
    """Small PNGs of one iteration next to its files; returns their paths.

    class2d: ``<root>_itNNN_classes.png`` (montage with fractions and resolutions);
    class3d: ``<root>_itNNN_slices.png``; refine3d: ``<root>_itNNN_fsc.png`` and
    ``<root>_itNNN_slices.png`` (half-set 1). Reads only the iteration's model and maps
    (no particles), so it costs well under a second at small boxes.
    """
    from cryodask.em.model import read_model
    from cryodask.io.mrc import read_map, read_stack
    from cryodask.plots import plot_class_montage, plot_fsc, plot_map_slices
    from cryodask.runs import _resolve

    stem = f"{root}_it{int(iteration):03d}"
    if kind not in ("class2d", "class3d", "refine3d"):
        raise ValueError(f"write_iteration_plots: kind {kind!r}: give class2d, class3d or refine3d")
    mpath = Path(f"{stem}_half1_model.star" if kind == "refine3d" else f"{stem}_model.star")
    model = read_model(mpath)
    out: list[Path] = []
    title = f"{Path(root).name} iteration {int(iteration)}"
    if kind == "class2d":
        p = Path(f"{stem}_classes.mrcs")
        fig = plot_class_montage(np.asarray(read_stack(p, mmap=False)), class_fractions=model.class_fractions,
                                 resolutions=model.estimated_resolution, title=title)
        out.append(Path(f"{stem}_classes.png"))
        _png(fig, out[-1], dpi)
        return out
    if kind == "refine3d" and np.any(model.fsc[0] != 0):
        fig = plot_fsc(model.fsc[0], model.pixel_size, model.ori_size)
        out.append(Path(f"{stem}_fsc.png"))
        _png(fig, out[-1], dpi)
    maps = []
    for ref in model.references:
        q = _resolve(ref, mpath)
        if q is not None:
            maps.append(read_map(q)[0])
    if maps:
        labels = [f"class {k + 1} {100 * f:.0f}%" for k, f in enumerate(model.class_fractions)] \
            if kind == "class3d" else ["half 1"]
        fig = plot_map_slices(maps, labels=labels[: len(maps)], title=title)
        out.append(Path(f"{stem}_slices.png"))
        _png(fig, out[-1], dpi)
    return out
