"""cryodask.plots: the numbers drawn are the numbers given (resolution, panels, counts per cell)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cryodask import plots
from cryodask.analysis.fsc import resolution_at


def _annotation(fig) -> str:
    return next(t.get_text() for ax in fig.axes for t in ax.texts if t.get_text().startswith("FSC "))


def test_fsc_plot_annotates_relions_resolution_and_draws_the_thresholds():
    box, apix = 64, 1.5
    shells = np.arange(box // 2 + 1)
    curve = 1.0 / (1.0 + np.exp((shells - 17.3) / 1.5))  # crosses 0.143 between shells 19 and 20
    fig = plots.plot_fsc(curve, apix, box)
    expected = resolution_at(curve, 0.143, apix, box)
    assert expected == pytest.approx(box * apix / 19)
    text = _annotation(fig)
    assert float(re.search(r"([\d.]+) Å", text).group(1)) == pytest.approx(expected, abs=0.005)
    ax = fig.axes[0]
    ys = sorted({round(float(line.get_ydata()[0]), 3) for line in ax.lines if len(set(line.get_ydata())) == 1})
    assert ys == [0.143, 0.5]
    xs = [line.get_xdata() for line in ax.lines if len(line.get_xdata()) == len(curve)]
    np.testing.assert_allclose(xs[0], shells / (box * apix))
    # the vertical marker sits at the annotated resolution
    vx = [float(line.get_xdata()[0]) for line in ax.lines if len(set(np.atleast_1d(line.get_xdata()))) == 1]
    assert any(abs(v - 1 / expected) < 1e-9 for v in vx)


def test_fsc_plot_into_given_axes_overlays_curves():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    a = np.linspace(1, -0.1, 33)
    out = plots.plot_fsc(a, 2.0, ax=ax, label="a")
    plots.plot_fsc(a ** 2, 2.0, ax=ax, label="b")
    assert out is fig
    texts = sorted(t.get_text() for t in ax.texts if t.get_text().startswith("FSC"))
    assert texts == sorted([f"FSC 0.143: {resolution_at(a, 0.143, 2.0):.2f} Å",
                            f"FSC 0.143: {resolution_at(a ** 2, 0.143, 2.0):.2f} Å"])


def _labels(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == "class-label"]


def test_class_montage_has_one_labelled_panel_per_class(rng):
    k, b = 7, 16
    imgs = rng.normal(size=(k, b, b)).astype(np.float32)
    fr = np.array([0.1, 0.3, 0.05, 0.2, 0.15, 0.12, 0.08])
    res = np.arange(10.0, 17.0)
    fig = plots.plot_class_montage(imgs, class_fractions=fr, resolutions=res, ncols=3)
    labels = _labels(fig)
    assert len(labels) == k
    assert labels[1] == "2 30.0% 11Å"
    tiled = fig.axes[0].images[0].get_array()
    assert tiled.shape == (3 * (b + 2) - 2, 3 * (b + 2) - 2)
    # panel 5 (row 1, column 1) is image 5, scaled between its 1st and 99th percentiles
    panel = np.asarray(tiled[b + 2: 2 * b + 2, b + 2: 2 * b + 2])
    lo, hi = np.percentile(imgs[4], [1, 99])
    np.testing.assert_allclose(panel, np.clip((imgs[4] - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert np.isnan(np.asarray(tiled)[-1, -1])  # 9 cells, 7 panels: the last cells are empty


def test_class_montage_sorted_by_fraction(rng):
    imgs = rng.normal(size=(4, 8, 8))
    fig = plots.plot_class_montage(imgs, class_fractions=[0.1, 0.4, 0.2, 0.3], order="fraction")
    assert [lbl.split()[0] for lbl in _labels(fig)] == ["2", "4", "3", "1"]
    with pytest.raises(ValueError):
        plots.plot_class_montage(imgs, order="fraction")


def test_map_slices_one_row_per_map(rng):
    vols = [rng.normal(size=(12, 12, 12)) for _ in range(3)]
    fig = plots.plot_map_slices(vols, labels=["a", "b", "c"])
    assert len(fig.axes) == 3 * 6
    first = fig.axes[6].images[0].get_array()  # row 2, "slice z"
    v = vols[1]
    lo, hi = np.percentile(v[6], [1, 99])
    np.testing.assert_allclose(first, np.clip((v[6] - lo) / (hi - lo), 0, 1), atol=1e-6)
    proj = fig.axes[6 + 4].images[0].get_array()  # "proj y"
    s = v.sum(axis=1)
    lo, hi = np.percentile(s, [1, 99])
    np.testing.assert_allclose(proj, np.clip((s - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert [fig.axes[r * 6].get_ylabel() for r in range(3)] == ["a", "b", "c"]
    assert len(plots.plot_map_slices(vols[0], projections=False).axes) == 3


def test_angular_distribution_counts_every_particle_in_equal_area_cells(rng):
    n = 20000
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    tilt = np.degrees(np.arccos(v[:, 2]))
    rot = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    counts, lon, lat = plots.angular_histogram(rot, tilt, n_lon=8, n_lat=6)
    assert counts.sum() == n
    # uniform directions fill equal-area cells equally (Poisson: ±3σ of 20000/48 ≈ 417)
    assert np.abs(counts - n / 48).max() < 4 * np.sqrt(n / 48)
    fig = plots.plot_angular_distribution(rot, tilt)
    mesh = fig.axes[0].collections[0]
    assert float(np.asarray(mesh.get_array()).sum()) == n
    # tilt 0 looks down z: the top band; rot 90 → longitude +90°
    c, lon_e, lat_e = plots.angular_histogram([90.0], [0.0], n_lon=4, n_lat=4)
    assert c[-1, 3] == 1 and c.sum() == 1


def test_convergence_has_a_panel_per_quantity():
    hist = [dict(iteration=i, resolution=30.0 - i, class_fractions=[0.5 - 0.1 * i, 0.5 + 0.1 * i],
                 changes_orient=999.0 if i == 1 else 10.0 / i, changes_offset=1.0, changes_classes=0.1, ave_pmax=0.2)
            for i in range(1, 4)]
    fig = plots.plot_convergence(hist)
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert titles == ["resolution", "class fractions", "changes", "changes of class", "Pmax"]
    res = fig.axes[0].lines[0]
    np.testing.assert_allclose(res.get_ydata(), [29, 28, 27])
    orient = fig.axes[2].lines[0].get_ydata()
    assert np.isnan(orient[0]) and orient[2] == pytest.approx(10 / 3)  # 999 = unknown, left out
    assert len(plots.plot_convergence([dict(iteration=1, resolution=20.0)]).axes[0].lines) == 1
    # a quantity that is never known (999 throughout) gets no panel
    unknown = [dict(iteration=i, resolution=20.0, changes_orient=999.0, changes_offset=999.0) for i in (1, 2)]
    assert [a.get_title() for a in plots.plot_convergence(unknown).axes if a.get_title()] == ["resolution"]


def test_save_figure_writes_a_png(tmp_path):
    fig = plots.plot_fsc(np.linspace(1, 0, 9), 3.0)
    plots.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]
