"""Pictures of a run with matplotlib: FSC, class montages, map slices, angular distribution, convergence.

Every function takes arrays (and optionally an ``Axes`` to draw into) and returns the
``matplotlib.figure.Figure``. Figures are made with :class:`matplotlib.figure.Figure`
directly, not through ``pyplot``: no display is needed (PNG files are written by the Agg
canvas), nothing is registered in pyplot's global figure list, and a figure returned as
the last value of a Jupyter cell is shown once, inline. Nothing here calls ``plt.show``.

Examples
--------
>>> from cryodask.plots import plot_fsc
>>> fig = plot_fsc(run.fsc, run.pixel_size, run.box)   # doctest: +SKIP
>>> fig.savefig("fsc.png")                              # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plot_fsc", "plot_class_montage", "plot_map_slices", "plot_angular_distribution",
           "plot_convergence", "montage", "save_figure"]


def _new_figure(figsize: tuple[float, float], ax: Any = None, **subplot: Any) -> tuple[Any, Any]:
    """(figure, axes): ``ax``'s figure when given, else a fresh pyplot-free figure with one subplot."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot(**subplot)


def save_figure(fig: Any, path: Any, *, dpi: int = 100) -> None:
    """Write ``fig`` as a PNG atomically (temporary name, then rename)."""
    from cryodask.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # the temporary name may lack the .png suffix: say the format
            fig.savefig(f, format="png", dpi=dpi)


# ---------------------------------------------------------------------------------------------
# FSC


def plot_fsc(fsc: Any, pixel_size: float, box: int | None = None, ax: Any = None, *, label: str | None = None,
             thresholds: Sequence[float] = (0.143, 0.5), annotate: float = 0.143) -> Any:
    """FSC curve against spatial frequency, with the 0.143 and 0.5 lines and the resolution marked.

    Parameters
    ----------
    fsc
        FSC per shell ``0 … box//2`` (e.g. ``rlnGoldStandardFsc`` of a ``_model.star``).
    pixel_size
        Å per pixel.
    box
        Box size in pixels (default ``2·(len(fsc)-1)``).
    ax
        Axes to draw into (a new figure otherwise); call again with the same ``ax`` to overlay curves.
    label
        Legend label of the curve.
    thresholds
        Horizontal lines drawn.
    annotate
        The threshold whose resolution is written on the plot (RELION's rule,
        :func:`cryodask.analysis.fsc.resolution_at`) as ``"FSC 0.143: 7.52 Å"``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from cryodask.analysis.fsc import resolution_at, shell_frequencies

    curve = np.asarray(fsc, dtype=np.float64).ravel()
    box = 2 * (len(curve) - 1) if box is None else int(box)
    freq = shell_frequencies(box, pixel_size)[: len(curve)]
    fig, ax = _new_figure((5.0, 3.6), ax)
    line, = ax.plot(freq, curve, lw=1.6, label=label)
    styles = {0.143: ("0.3", "--"), 0.5: ("0.6", ":")}
    for t in thresholds:
        color, ls = styles.get(round(t, 3), ("0.5", "-."))
        ax.axhline(t, color=color, ls=ls, lw=0.9)
        ax.annotate(f"{t:g}", (1.0, t), xycoords=("axes fraction", "data"), xytext=(2, 0),
                    textcoords="offset points", va="center", fontsize=7, color=color)
    res = resolution_at(curve, annotate, pixel_size, box)
    if np.isfinite(res):
        ax.axvline(1.0 / res, color=line.get_color(), lw=0.8, alpha=0.6)
    n_text = sum(1 for t in ax.texts if t.get_text().startswith("FSC "))
    ax.text(0.97, 0.95 - 0.08 * n_text, f"FSC {annotate:g}: {res:.2f} Å", transform=ax.transAxes, ha="right",
            va="top", color=line.get_color(), fontsize=9)
    ax.set_xlim(0, freq[-1] if len(freq) else 1.0)
    ax.set_ylim(min(-0.05, float(np.nanmin(curve)) - 0.02) if len(curve) else -0.05, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    _resolution_ticks(ax, freq[-1] if len(freq) else 1.0)
    if label:
        ax.legend(loc="lower left", fontsize=8)
    return fig


def _resolution_ticks(ax: Any, fmax: float) -> None:
    """A top axis labelled in Å at round resolutions (once per axes)."""
    if getattr(ax, "_cryodask_top", None) is not None:
        return
    top = ax.twiny()
    ax._cryodask_top = top
    top.set_xlim(ax.get_xlim())
    nice = np.array([100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5, 1.2, 1.0])
    res = nice[(1.0 / nice > 0) & (1.0 / nice <= fmax * 1.0001)]
    if len(res) > 8:
        res = res[np.linspace(0, len(res) - 1, 8).round().astype(int)]
    top.set_xticks(1.0 / res)
    top.set_xticklabels([f"{r:g}" for r in res], fontsize=7)
    top.set_xlabel("resolution (Å)", fontsize=8)


# ---------------------------------------------------------------------------------------------
# 2D classes


def _normalise(img: np.ndarray) -> np.ndarray:
    """Each panel scaled to [0, 1] between its 1st and 99th percentiles (RELION's display scales each image)."""
    lo, hi = np.percentile(img, [1, 99])
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    return np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)


def montage(images: Any, ncols: int | None = None, *, gap: int = 2) -> tuple[np.ndarray, int, int]:
    """Tile ``images`` ``(K, B, B)`` into one array, each normalised; returns (tiled, rows, columns).

    Empty cells and the gaps between panels are NaN (drawn as the background).
    """
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim == 2:
        imgs = imgs[None]
    if imgs.ndim != 3:
        raise ValueError(f"montage: images must be (K, B, B), not {imgs.shape}")
    k, h, w = imgs.shape
    ncols = int(ncols or max(1, int(np.ceil(np.sqrt(k * 1.5)))))
    ncols = min(ncols, k) if k else 1
    nrows = int(np.ceil(k / ncols)) if k else 1
    out = np.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap), np.nan, np.float32)
    for i in range(k):
        r, c = divmod(i, ncols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = _normalise(imgs[i])
    return out, nrows, ncols


def plot_class_montage(images: Any, *, class_fractions: Any = None, resolutions: Any = None,
                       order: str | Sequence[int] = "class", ncols: int | None = None, ax: Any = None,
                       title: str | None = None) -> Any:
    """Montage of 2D class averages, labelled with class number, fraction and resolution when given.

    Parameters
    ----------
    images
        ``(K, B, B)`` class averages (e.g. ``<o>_itNNN_classes.mrcs``).
    class_fractions
        ``rlnClassDistribution`` per class; shown as a percentage.
    resolutions
        ``rlnEstimatedResolution`` per class (Å).
    order
        ``"class"`` (class number), ``"fraction"`` (most populated first, as RELION's selection GUI
        sorts), or explicit 0-based class indices (a subset is allowed).
    ncols
        Panels per row (default: about 1.5·√K).

    Returns
    -------
    matplotlib.figure.Figure
        One axes holding the tiled image; each panel's label is a text whose first word is the
        1-based class number.
    """
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim == 2:
        imgs = imgs[None]
    k = imgs.shape[0]
    fr = None if class_fractions is None else np.asarray(class_fractions, np.float64).ravel()
    rs = None if resolutions is None else np.asarray(resolutions, np.float64).ravel()
    if isinstance(order, str):
        if order == "class":
            idx = np.arange(k)
        elif order == "fraction":
            if fr is None:
                raise ValueError("plot_class_montage: order='fraction' needs class_fractions")
            idx = np.argsort(-fr, kind="stable")
        else:
            raise ValueError(f"plot_class_montage: order {order!r}: give 'class', 'fraction' or indices")
    else:
        idx = np.asarray(order, dtype=np.int64)
    tiled, nrows, nc = montage(imgs[idx], ncols)
    h, w = imgs.shape[1:]
    fig, ax = _new_figure((max(2.0, 1.1 * nc), max(1.6, 1.2 * nrows) + (0.3 if title else 0)), ax)
    ax.imshow(tiled, cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    ax.set_facecolor("white")
    ax.set_axis_off()
    for i, c in enumerate(idx):
        r, col = divmod(i, nc)
        parts = [f"{c + 1}"]
        if fr is not None:
            parts.append(f"{100 * fr[c]:.1f}%")
        if rs is not None and np.isfinite(rs[c]) and rs[c] < 999:
            parts.append(f"{rs[c]:.0f}Å")
        ax.text(col * (w + 2) + 1, r * (h + 2) + 1, " ".join(parts), color="yellow", fontsize=6, va="top",
                ha="left", gid="class-label")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# 3D maps

_VIEWS = (("slice z", lambda v: v[v.shape[0] // 2]), ("slice y", lambda v: v[:, v.shape[1] // 2]),
          ("slice x", lambda v: v[:, :, v.shape[2] // 2]), ("proj z", lambda v: v.sum(axis=0)),
          ("proj y", lambda v: v.sum(axis=1)), ("proj x", lambda v: v.sum(axis=2)))


def plot_map_slices(vol: Any, *, labels: Sequence[str] | None = None, projections: bool = True,
                    title: str | None = None) -> Any:
    """Central slices (and projections) of one or several 3D maps; one row per map.

    Parameters
    ----------
    vol
        A map ``(N, N, N)`` (arrays as read from MRC: z, y, x), or a sequence / ``(K, N, N, N)``
        array of maps (e.g. the classes of a class3d run).
    labels
        Row labels (default ``class 1``, ``class 2``…).
    projections
        Also show the sums along z, y and x.

    Returns
    -------
    matplotlib.figure.Figure
        ``rows × (3 or 6)`` axes; each image is normalised on its own.
    """
    from matplotlib.figure import Figure

    if isinstance(vol, np.ndarray) and vol.ndim == 3:
        vols = [vol]
    else:
        vols = [np.asarray(v) for v in vol]
    for v in vols:
        if v.ndim != 3:
            raise ValueError(f"plot_map_slices: maps must be 3D, not {v.shape}")
    views = _VIEWS if projections else _VIEWS[:3]
    labels = list(labels) if labels is not None else [f"class {i + 1}" for i in range(len(vols))]
    fig = Figure(figsize=(1.4 * len(views) + 0.4, 1.45 * len(vols) + (0.35 if title else 0.15)), layout="constrained")
    axes = fig.subplots(len(vols), len(views), squeeze=False)
    for r, v in enumerate(vols):
        v = np.asarray(v, dtype=np.float32)
        for c, (name, view) in enumerate(views):
            a = axes[r, c]
            a.imshow(_normalise(view(v)), cmap="gray", origin="lower", interpolation="nearest", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(name, fontsize=8)
            if c == 0:
                a.set_ylabel(labels[r] if r < len(labels) else "", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# angles


def angular_histogram(rot: Any, tilt: Any, *, weights: Any = None, n_lon: int = 72, n_lat: int = 36
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of viewing directions in equal-area cells: (counts ``(n_lat, n_lon)``, lon edges, lat edges) in radians.

    Longitude is ``rot`` wrapped to [-180°, 180°); latitude is ``90° - tilt`` (tilt 0: the north pole,
    looking down z). Cells are equal in ``sin(latitude)``, so equal counts mean equal density.
    """
    rot = np.asarray(rot, np.float64).ravel()
    tilt = np.asarray(tilt, np.float64).ravel()
    lon = np.deg2rad((rot + 180.0) % 360.0 - 180.0)
    z = np.cos(np.deg2rad(tilt))  # sin(latitude)
    lon_edges = np.linspace(-np.pi, np.pi, n_lon + 1)
    z_edges = np.linspace(-1.0, 1.0, n_lat + 1)
    counts, _, _ = np.histogram2d(np.clip(z, -1, 1), lon, bins=(z_edges, lon_edges),
                                  weights=None if weights is None else np.asarray(weights, np.float64).ravel())
    return counts, lon_edges, np.arcsin(z_edges)


def plot_angular_distribution(rot: Any, tilt: Any, *, weights: Any = None, ax: Any = None, n_lon: int = 72,
                              n_lat: int = 36, title: str | None = None) -> Any:
    """Histogram of viewing directions over the sphere (Mollweide projection, equal-area cells).

    Parameters
    ----------
    rot, tilt
        Euler angles in degrees (``rlnAngleRot``, ``rlnAngleTilt``); psi does not change the direction.
    weights
        Optional weight per particle (e.g. ``rlnMaxValueProbDistribution``).
    ax
        Axes to draw into; a Mollweide axes is made when omitted.

    Returns
    -------
    matplotlib.figure.Figure
        The counts per cell are the mesh's array (they sum to the number of particles, or the weights).
    """
    counts, lon_e, lat_e = angular_histogram(rot, tilt, weights=weights, n_lon=n_lon, n_lat=n_lat)
    fig, ax = _new_figure((6.0, 3.4), ax, projection="mollweide")
    data = np.ma.masked_equal(counts, 0)
    mesh = ax.pcolormesh(lon_e, lat_e, data, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, shrink=0.7, label="particles per cell")
    ax.grid(True, lw=0.3, alpha=0.5)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("rot (°)", fontsize=8)
    ax.set_ylabel("90° − tilt", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# convergence

# key in a history entry -> aliases the jobs use
_ALIASES = {
    "changes_orientations": ("changes_orientations", "changes_orient"),
    "changes_offsets": ("changes_offsets", "changes_offset"),
    "ave_pmax": ("ave_pmax", "pmax"),
}


def _records(history: Any) -> list[dict[str, Any]]:
    if hasattr(history, "to_dict") and hasattr(history, "columns"):  # a DataFrame
        return [dict(r) for r in history.to_dict("records")]
    return [dict(h) for h in history]


def _series(recs: list[dict[str, Any]], key: str) -> np.ndarray | None:
    for name in _ALIASES.get(key, (key,)):
        vals = [r.get(name) for r in recs]
        if any(v is not None for v in vals):
            out = np.array([np.nan if v is None else float(v) for v in vals])
            out[(out >= 998) & (out <= 1000)] = np.nan  # RELION's 999: "not known yet"
            return None if np.all(np.isnan(out)) else out
    return None


def plot_convergence(history: Any, *, title: str | None = None) -> Any:
    """Per-iteration numbers of a run: resolution, class fractions, changes of angles / offsets / classes, Pmax.

    Parameters
    ----------
    history
        A list of dicts (one per iteration; the jobs' ``result.history``) or a DataFrame
        (:attr:`cryodask.runs.Run.history`). Keys used when present: ``iteration``,
        ``resolution`` (and ``gold_resolution``), ``class_fractions`` (a sequence per iteration),
        ``changes_orientations``/``changes_orient`` (°), ``changes_offsets``/``changes_offset`` (Å),
        ``changes_classes`` (fraction of particles), ``ave_pmax``. Values of 999 (RELION's "unknown")
        are left out.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per quantity present, each panel's title naming it.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    recs = _records(history)
    it = _series(recs, "iteration")
    x = np.arange(1, len(recs) + 1) if it is None else it
    panels: list[tuple[str, list[tuple[str, np.ndarray]], str]] = []
    res = [(lbl, s) for lbl, k in (("resolution", "resolution"), ("FSC 0.143", "gold_resolution"))
           if (s := _series(recs, k)) is not None]
    if res:
        panels.append(("resolution", res, "Å"))
    fr = [r.get("class_fractions") for r in recs]
    if any(f is not None and np.size(f) > 1 for f in fr):
        k = max(np.size(f) for f in fr if f is not None)
        arr = np.full((len(recs), k), np.nan)
        for i, f in enumerate(fr):
            if f is not None:
                arr[i, : np.size(f)] = np.asarray(f, np.float64).ravel()
        panels.append(("class fractions", [(f"class {j + 1}", arr[:, j]) for j in range(k)], ""))
    ch = [(lbl, s) for lbl, key in (("orientations (°)", "changes_orientations"), ("offsets (Å)", "changes_offsets"))
          if (s := _series(recs, key)) is not None]
    if ch:
        panels.append(("changes", ch, ""))
    cc = _series(recs, "changes_classes")
    if cc is not None:
        panels.append(("changes of class", [("fraction", cc)], ""))
    pm = _series(recs, "ave_pmax")
    if pm is not None:
        panels.append(("Pmax", [("<Pmax>", pm)], ""))
    n = max(1, len(panels))
    ncols = min(n, 3)
    nrows = int(np.ceil(n / ncols))
    fig = Figure(figsize=(3.2 * ncols, 2.4 * nrows + (0.3 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for a, (name, lines, unit) in zip(axes, panels):
        for lbl, y in lines:
            a.plot(x, y, marker="o", ms=3, lw=1.2, label=lbl)
        a.set_title(name, fontsize=9)
        a.set_xlabel("iteration", fontsize=8)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if unit:
            a.set_ylabel(unit, fontsize=8)
        a.tick_params(labelsize=7)
        if len(lines) > 1 and len(lines) <= 12:
            a.legend(fontsize=6)
    for a in axes[len(panels):]:
        a.set_axis_off()
    if not panels:
        axes[0].text(0.5, 0.5, "no iterations yet", ha="center", va="center", transform=axes[0].transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig

