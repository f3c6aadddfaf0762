"""The model of an EM run (RELION's ``MlModel``) and its ``_model.star`` file.

One :class:`Model` holds what RELION writes to ``<o>_itNNN_model.star``: the references
(as file names; the maps themselves live in MRC files next to it), the per-class spectra
(τ², SSNR, gold-standard FSC, σ² of the reconstruction), the noise spectrum σ² per optics
group, the class fractions and direction priors, the offset spread, the per-group scale,
and the current resolution and image size. Auto-refine keeps one model per half-set
(``_half1_model.star``, ``_half2_model.star``), as RELION does.

Block and label names are RELION 3.1's:

* ``model_general``: key/value pairs (``rlnCurrentResolution``, ``rlnCurrentImageSize``…);
* ``model_classes``: one row per class (``rlnReferenceImage``, ``rlnClassDistribution``,
  ``rlnAccuracyRotations``, ``rlnAccuracyTranslationsAngst``, ``rlnEstimatedResolution``,
  ``rlnOverallFourierCompleteness``);
* ``model_class_N``: per shell (``rlnSpectralIndex``, ``rlnResolution``,
  ``rlnAngstromResolution``, ``rlnSsnrMap``, ``rlnGoldStandardFsc``,
  ``rlnFourierCompleteness``, ``rlnReferenceSigma2``, ``rlnReferenceTau2``,
  ``rlnSpectralOrientabilityContribution``);
* ``model_optics_group_N``: per shell ``rlnSigma2Noise``;
* ``model_groups``: ``rlnGroupNumber``, ``rlnGroupName``, ``rlnGroupNrParticles``,
  ``rlnGroupScaleCorrection``;
* ``model_pdf_orient_class_N``: ``rlnOrientationDistribution`` per direction.

σ² and τ² follow RELION's normalisation (forward FFT divided by the number of pixels;
σ² per real/imaginary component).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryodask.errors import UserError, where
from cryodask.io.star import read_star, write_star

__all__ = ["Model", "write_model", "read_model", "shell_resolution_table", "match_scale_groups"]


def shell_resolution_table(ori_size: int, pixel_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rlnSpectralIndex, rlnResolution in 1/Å, rlnAngstromResolution) of shells ``0 … N/2``."""
    idx = np.arange(ori_size // 2 + 1)
    res = idx / (ori_size * pixel_size)
    with np.errstate(divide="ignore"):
        ang = np.where(idx > 0, 1.0 / np.where(res > 0, res, 1.0), 999.0)
    return idx, res, ang


def _zeros(k: int, n: int) -> np.ndarray:
    return np.zeros((k, n), dtype=np.float64)


@dataclass
class Model:
    """RELION's ``MlModel`` for one run (or one half-set of an auto-refine run).

    Spectra are ``(n_classes, N//2+1)`` (``(n_optics_groups, N//2+1)`` for the noise),
    float64, indexed by shell in pixels of the original box.
    """

    ori_size: int
    pixel_size: float
    n_classes: int = 1
    n_optics_groups: int = 1
    pad: float = 2.0
    tau2_fudge: float = 1.0
    current_resolution: float = -1.0  # Å
    current_size: int = -1
    references: list[str] = field(default_factory=list)
    class_fractions: np.ndarray | None = None
    acc_rot: np.ndarray | None = None  # degrees per class
    acc_trans: np.ndarray | None = None  # Å per class
    estimated_resolution: np.ndarray | None = None  # Å per class
    fourier_completeness: np.ndarray | None = None  # overall, per class
    tau2: np.ndarray | None = None
    sigma2_class: np.ndarray | None = None  # rlnReferenceSigma2 (σ² of the reconstruction)
    data_vs_prior: np.ndarray | None = None  # rlnSsnrMap
    fsc: np.ndarray | None = None  # rlnGoldStandardFsc
    fourier_coverage: np.ndarray | None = None
    orientability: np.ndarray | None = None
    sigma2_noise: np.ndarray | None = None  # (n_optics_groups, nsh)
    optics_group_names: list[str] = field(default_factory=list)
    group_names: list[str] = field(default_factory=list)
    group_nr_particles: np.ndarray | None = None
    scale: np.ndarray | None = None  # per group
    pdf_direction: list[np.ndarray] = field(default_factory=list)  # one (n_directions,) per class
    sigma_offset: float = 10.0  # Å
    avg_norm: float = 1.0
    log_likelihood: float = 0.0
    ave_pmax: float = 0.0
    sigma_rot: float = 0.0
    sigma_tilt: float = 0.0
    sigma_psi: float = 0.0
    orientational_prior_mode: int = 0
    reference_dimensionality: int = 3  # 2 for 2D classification (class averages), 3 for maps

    def __post_init__(self) -> None:
        k, o, n = self.n_classes, self.n_optics_groups, self.n_shells
        defaults = {
            "class_fractions": np.full(k, 1.0 / k), "acc_rot": np.full(k, 999.0), "acc_trans": np.full(k, 999.0),
            "estimated_resolution": np.full(k, 999.0), "fourier_completeness": np.zeros(k),
            "tau2": _zeros(k, n), "sigma2_class": _zeros(k, n), "data_vs_prior": _zeros(k, n), "fsc": _zeros(k, n),
            "fourier_coverage": _zeros(k, n), "orientability": _zeros(k, n), "sigma2_noise": _zeros(o, n),
        }
        for name, value in defaults.items():
            cur = getattr(self, name)
            setattr(self, name, value if cur is None else np.array(cur, dtype=np.float64))
        if not self.optics_group_names:
            self.optics_group_names = [f"opticsGroup{g + 1}" for g in range(o)]
        if not self.group_names:
            self.group_names = list(self.optics_group_names)
        g = len(self.group_names)
        self.group_nr_particles = np.zeros(g, np.int64) if self.group_nr_particles is None else \
            np.asarray(self.group_nr_particles, np.int64)
        self.scale = np.ones(g) if self.scale is None else np.asarray(self.scale, np.float64)

    @property
    def n_shells(self) -> int:
        return self.ori_size // 2 + 1

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def copy(self) -> "Model":
        from copy import deepcopy

        return deepcopy(self)


def _general(m: Model) -> dict[str, Any]:
    return {
        "rlnReferenceDimensionality": int(m.reference_dimensionality),
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": m.ori_size,
        "rlnCurrentResolution": m.current_resolution,
        "rlnCurrentImageSize": m.current_size,
        "rlnPaddingFactor": float(m.pad),
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": float(m.pixel_size),
        "rlnNrClasses": m.n_classes,
        "rlnNrBodies": 1,
        "rlnNrGroups": m.n_groups,
        "rlnNrOpticsGroups": m.n_optics_groups,
        "rlnTau2FudgeFactor": float(m.tau2_fudge),
        "rlnNormCorrectionAverage": float(m.avg_norm),
        "rlnSigmaOffsetsAngst": float(m.sigma_offset),
        "rlnOrientationalPriorMode": int(m.orientational_prior_mode),
        "rlnSigmaPriorRotAngle": float(m.sigma_rot),
        "rlnSigmaPriorTiltAngle": float(m.sigma_tilt),
        "rlnSigmaPriorPsiAngle": float(m.sigma_psi),
        "rlnLogLikelihood": float(m.log_likelihood),
        "rlnAveragePmax": float(m.ave_pmax),
    }


def write_model(path: str | os.PathLike[str], model: Model) -> None:
    """Write ``model`` as RELION 3.1's ``_model.star`` (atomically)."""
    m = model
    idx, res, ang = shell_resolution_table(m.ori_size, m.pixel_size)
    refs = list(m.references) + [""] * (m.n_classes - len(m.references))
    blocks: dict[str, Any] = {"model_general": _general(m)}
    blocks["model_classes"] = pd.DataFrame({
        "rlnReferenceImage": refs,
        "rlnClassDistribution": m.class_fractions,
        "rlnAccuracyRotations": m.acc_rot,
        "rlnAccuracyTranslationsAngst": m.acc_trans,
        "rlnEstimatedResolution": m.estimated_resolution,
        "rlnOverallFourierCompleteness": m.fourier_completeness,
    })
    for k in range(m.n_classes):
        blocks[f"model_class_{k + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": idx, "rlnResolution": res, "rlnAngstromResolution": ang,
            "rlnSsnrMap": m.data_vs_prior[k], "rlnGoldStandardFsc": m.fsc[k],
            "rlnFourierCompleteness": m.fourier_coverage[k], "rlnReferenceSigma2": m.sigma2_class[k],
            "rlnReferenceTau2": m.tau2[k], "rlnSpectralOrientabilityContribution": m.orientability[k],
        })
    for o in range(m.n_optics_groups):
        blocks[f"model_optics_group_{o + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": idx, "rlnResolution": res, "rlnSigma2Noise": m.sigma2_noise[o]})
    blocks["model_groups"] = pd.DataFrame({
        "rlnGroupNumber": np.arange(1, m.n_groups + 1), "rlnGroupName": m.group_names,
        "rlnGroupNrParticles": m.group_nr_particles, "rlnGroupScaleCorrection": m.scale})
    for k, pdf in enumerate(m.pdf_direction):
        blocks[f"model_pdf_orient_class_{k + 1}"] = pd.DataFrame(
            {"rlnOrientationDistribution": np.asarray(pdf, np.float64)})
    write_star(path, blocks)


def _col(df: pd.DataFrame, label: str, path: Path, block: str) -> np.ndarray:
    if label not in df.columns:
        raise UserError(where(path, field=label), f"block data_{block} has no column {label}; "
                                                   "give a _model.star written by cryodask or RELION 3.1+")
    return np.array(pd.to_numeric(df[label], errors="coerce").to_numpy(np.float64), copy=True)


def read_model(path: str | os.PathLike[str]) -> Model:
    """Read a ``_model.star`` written by :func:`write_model` (or by RELION 3.1+)."""
    path = Path(path)
    blocks = read_star(path)
    for b in ("model_general", "model_classes"):
        if b not in blocks:
            raise UserError(path, f"has no data_{b} block; give a _model.star file")
    g = blocks["model_general"]
    if not isinstance(g, dict):
        g = dict(g.attrs.get("pairs", {}))

    def val(label: str, default: Any = None) -> Any:
        if label in g:
            return g[label]
        if default is None:
            raise UserError(where(path, field=label), "missing from data_model_general")
        return default

    k = int(val("rlnNrClasses"))
    n_opt = int(val("rlnNrOpticsGroups", 1))
    ori = int(val("rlnOriginalImageSize"))
    classes = blocks["model_classes"]
    groups = blocks.get("model_groups")
    m = Model(ori_size=ori, pixel_size=float(val("rlnPixelSize")), n_classes=k, n_optics_groups=n_opt,
              pad=float(val("rlnPaddingFactor", 2.0)), tau2_fudge=float(val("rlnTau2FudgeFactor", 1.0)),
              current_resolution=float(val("rlnCurrentResolution")), current_size=int(val("rlnCurrentImageSize")),
              references=[str(s) for s in classes["rlnReferenceImage"]],
              class_fractions=_col(classes, "rlnClassDistribution", path, "model_classes"),
              sigma_offset=float(val("rlnSigmaOffsetsAngst", val("rlnSigmaOffsets", 10.0))),
              avg_norm=float(val("rlnNormCorrectionAverage", 1.0)),
              log_likelihood=float(val("rlnLogLikelihood", 0.0)), ave_pmax=float(val("rlnAveragePmax", 0.0)),
              sigma_rot=float(val("rlnSigmaPriorRotAngle", 0.0)), sigma_tilt=float(val("rlnSigmaPriorTiltAngle", 0.0)),
              sigma_psi=float(val("rlnSigmaPriorPsiAngle", 0.0)),
              orientational_prior_mode=int(val("rlnOrientationalPriorMode", 0)),
              reference_dimensionality=int(val("rlnReferenceDimensionality", 3)))
    for attr, label in (("acc_rot", "rlnAccuracyRotations"), ("acc_trans", "rlnAccuracyTranslationsAngst"),
                        ("estimated_resolution", "rlnEstimatedResolution"),
                        ("fourier_completeness", "rlnOverallFourierCompleteness")):
        if label in classes.columns:
            setattr(m, attr, _col(classes, label, path, "model_classes"))
    for c in range(k):
        name = f"model_class_{c + 1}"
        if name not in blocks:
            raise UserError(path, f"has no data_{name} block")
        df = blocks[name]
        for attr, label in (("data_vs_prior", "rlnSsnrMap"), ("fsc", "rlnGoldStandardFsc"),
                            ("fourier_coverage", "rlnFourierCompleteness"), ("sigma2_class", "rlnReferenceSigma2"),
                            ("tau2", "rlnReferenceTau2"), ("orientability", "rlnSpectralOrientabilityContribution")):
            if label in df.columns:
                getattr(m, attr)[c, :len(df)] = _col(df, label, path, name)[:m.n_shells]
        pdf = blocks.get(f"model_pdf_orient_class_{c + 1}")
        if pdf is not None:
            m.pdf_direction.append(_col(pdf, "rlnOrientationDistribution", path, f"model_pdf_orient_class_{c + 1}"))
    found = False
    for o in range(n_opt):
        name = f"model_optics_group_{o + 1}"
        if name in blocks:
            m.sigma2_noise[o, :len(blocks[name])] = _col(blocks[name], "rlnSigma2Noise", path, name)[:m.n_shells]
            found = True
    if not found:
        group_sigma2 = _group_sigma2(blocks, m.n_shells, path)
        if group_sigma2 is not None:
            m.sigma2_noise[:] = group_sigma2
    if groups is not None and len(groups):
        m.group_names = [str(s) for s in groups["rlnGroupName"]]
        m.group_nr_particles = _col(groups, "rlnGroupNrParticles", path, "model_groups").astype(np.int64)
        m.scale = _col(groups, "rlnGroupScaleCorrection", path, "model_groups")
    return m


def _group_sigma2(blocks: dict[str, Any], n_shells: int, path: Path) -> np.ndarray | None:
    """σ² from RELION 3.1's ``data_model_group_N`` blocks (its files before optics-group noise tables):
    the groups' spectra averaged with their particle counts as weights; None when there are none."""
    groups = blocks.get("model_groups")
    n = len(groups) if isinstance(groups, pd.DataFrame) else 0
    sig, wts = [], []
    for g in range(1, n + 1):
        name = f"model_group_{g}"
        b = blocks.get(name)
        if not isinstance(b, pd.DataFrame) or "rlnSigma2Noise" not in b.columns:
            continue
        v = np.zeros(n_shells)
        vals = _col(b, "rlnSigma2Noise", path, name)[:n_shells]
        v[:len(vals)] = vals
        sig.append(v)
        w = 1.0
        if "rlnGroupNrParticles" in groups.columns:
            w = float(pd.to_numeric(groups["rlnGroupNrParticles"], errors="coerce").iloc[g - 1])
        wts.append(w if np.isfinite(w) and w > 0 else 1e-30)
    if not sig:
        return None
    return np.average(np.stack(sig), axis=0, weights=np.asarray(wts))


def match_scale_groups(model: Model, group_names: list[str]) -> Model:
    """The model with the particles' scale groups. As many groups as the particles have: kept, in order (RELION
    names a group after its micrograph without the job's folder); otherwise (a run written when the groups were
    the optics groups) every group goes on with scale 1."""
    if len(model.group_names) != len(group_names):
        model.group_names = list(group_names)
        model.scale = np.ones(len(group_names))
        model.group_nr_particles = np.zeros(len(group_names), np.int64)
    return model
