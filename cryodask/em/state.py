"""The optimiser state of an EM run (RELION's ``MlOptimiser``) and its per-iteration files.

Per iteration ``n`` a run with rootname ``<o>`` writes, each atomically (temporary name,
then rename), as RELION does:

* ``<o>_itNNN_optimiser.star`` — ``data_optimiser_general``; its first comment line is the
  command line (as RELION's); holds the iteration, the convergence counters, the
  accuracies and the random seed;
* ``<o>_itNNN_sampling.star`` — ``data_sampling_general`` (HEALPix order, psi step,
  offset range / step, perturbation);
* ``<o>_itNNN_data.star`` — the particles with their new poses (optics + particles, RELION 3.1);
* ``<o>_itNNN_model.star``, or ``_half1_model.star`` / ``_half2_model.star`` for
  auto-refine (:mod:`cryodask.em.model`);
* maps ``<o>_itNNN_classNNN.mrc``, or ``<o>_itNNN_half1_class001.mrc`` / ``half2``.

Random numbers are drawn from generators seeded by ``(random_seed, iteration, purpose)``
(:func:`iteration_rng`), so no generator state has to be saved: ``--continue`` from
iteration ``k`` draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from cryodask.errors import UserError, where
from cryodask.io.atomic import atomic_path
from cryodask.io.star import read_star, write_star

__all__ = ["OptimiserState", "iteration_rng", "output_name", "write_optimiser", "read_optimiser",
           "write_sampling", "read_sampling", "command_line_of"]


def iteration_rng(seed: int, iteration: int, purpose: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, iteration, purpose): restarts draw the same numbers."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(iteration), int(purpose)])


def output_name(root: str | os.PathLike[str], iteration: int | None, what: str) -> Path:
    """``<root>_itNNN_<what>`` (``<root>_<what>`` for the final files when ``iteration`` is None)."""
    root = str(root)
    return Path(f"{root}_{what}" if iteration is None else f"{root}_it{iteration:03d}_{what}")


@dataclass
class OptimiserState:
    """What an iteration needs besides the model and the particles (RELION's ``MlOptimiser``).

    Field names follow RELION's members; :data:`_LABELS` maps them to STAR labels.
    """

    output_root: str = "run"
    iteration: int = 0
    n_iterations: int = 999
    random_seed: int = 0
    do_split_random_halves: bool = True
    low_resol_join_halves: float = -1.0
    adaptive_oversampling: int = 1
    adaptive_fraction: float = 0.999
    particle_diameter: float = -1.0
    width_mask_edge: int = 5
    do_zero_mask: bool = False
    do_solvent: bool = False
    incr_size: int = 10
    do_auto_refine: bool = True
    auto_local_healpix_order: int = 4
    nr_iter_wo_resol_gain: int = 0
    best_resol_thus_far: float = 0.0  # 1/Å
    nr_iter_wo_large_hidden_variable_changes: int = 0
    acc_rot: float = 999.0
    acc_trans: float = 999.0  # Å
    current_changes_optimal_orientations: float = 999.0
    current_changes_optimal_offsets: float = 999.0
    current_changes_optimal_classes: float = 999.0
    smallest_changes_optimal_orientations: float = 999.0
    smallest_changes_optimal_offsets: float = 999.0
    smallest_changes_optimal_classes: int = 9999999
    has_converged: bool = False
    has_high_fsc_at_limit: bool = False
    has_large_incr_size_iter_ago: int = 0
    do_ctf_correction: bool = True
    intact_ctf_first_peak: bool = False
    refs_are_ctf_corrected: bool = True
    do_norm_correction: bool = False
    do_scale_correction: bool = False
    max_pooled: int = 1
    firstiter_cc: bool = False
    ini_high: float = -1.0
    # sampling (also written to _sampling.star)
    healpix_order: int = 2
    psi_step: float = 15.0
    offset_range: float = 6.0  # pixels
    offset_step: float = 2.0  # pixels
    random_perturbation: float = 0.0
    perturbation_factor: float = 0.5
    sym: str = "C1"
    limit_tilt: float = -91.0
    healpix_order_original: int = 2
    psi_step_original: float = 15.0
    offset_range_original: float = 6.0
    offset_step_original: float = 2.0
    # cryodask additions
    local_searches: bool = False
    sigma_ang: float = -1.0
    coarse_size: int = -1
    do_join_random_halves: bool = False
    has_fine_enough_angular_sampling: bool = False
    solvent_mask: str = "None"  # --solvent_mask (a file name, or "None")
    do_skip_align: bool = False
    subtract_map: str = "None"  # class3d --skip_align with a focus mask: the consensus map outside the mask
    auto_focus_iter: int = 0  # class3d: last iterations without alignment, focused where the classes differ

    def copy(self) -> "OptimiserState":
        from dataclasses import replace

        return replace(self)


# field -> RELION label (cryodask's own keys start with rlnCryodask, which RELION ignores with a warning)
_LABELS: dict[str, str] = {
    "output_root": "rlnOutputRootName",
    "iteration": "rlnCurrentIteration",
    "n_iterations": "rlnNumberOfIterations",
    "random_seed": "rlnRandomSeed",
    "do_split_random_halves": "rlnDoSplitRandomHalves",
    "low_resol_join_halves": "rlnJoinHalvesUntilThisResolution",
    "adaptive_oversampling": "rlnAdaptiveOversampleOrder",
    "adaptive_fraction": "rlnAdaptiveOversampleFraction",
    "particle_diameter": "rlnParticleDiameter",
    "width_mask_edge": "rlnWidthMaskEdge",
    "do_zero_mask": "rlnDoZeroMask",
    "do_solvent": "rlnDoSolventFlattening",
    "incr_size": "rlnIncrementImageSize",
    "do_auto_refine": "rlnDoAutoRefine",
    "auto_local_healpix_order": "rlnAutoLocalSearchesHealpixOrder",
    "nr_iter_wo_resol_gain": "rlnNumberOfIterWithoutResolutionGain",
    "best_resol_thus_far": "rlnBestResolutionThusFar",
    "nr_iter_wo_large_hidden_variable_changes": "rlnNumberOfIterWithoutChangingAssignments",
    "acc_rot": "rlnOverallAccuracyRotations",
    "acc_trans": "rlnOverallAccuracyTranslationsAngst",
    "current_changes_optimal_orientations": "rlnChangesOptimalOrientations",
    "current_changes_optimal_offsets": "rlnChangesOptimalOffsets",
    "current_changes_optimal_classes": "rlnChangesOptimalClasses",
    "smallest_changes_optimal_orientations": "rlnSmallestChangesOrientations",
    "smallest_changes_optimal_offsets": "rlnSmallestChangesOffsets",
    "smallest_changes_optimal_classes": "rlnSmallestChangesClasses",
    "has_converged": "rlnHasConverged",
    "has_high_fsc_at_limit": "rlnHasHighFscAtResolLimit",
    "has_large_incr_size_iter_ago": "rlnHasLargeSizeIncreaseIterationsAgo",
    "do_ctf_correction": "rlnDoCorrectCtf",
    "intact_ctf_first_peak": "rlnDoIgnoreCtfUntilFirstPeak",
    "refs_are_ctf_corrected": "rlnRefsAreCtfCorrected",
    "do_norm_correction": "rlnDoCorrectNorm",
    "do_scale_correction": "rlnDoCorrectScale",
    "max_pooled": "rlnMaxNumberOfPooledParticles",
    "firstiter_cc": "rlnCryodaskFirstIterCc",
    "ini_high": "rlnCryodaskIniHigh",
    "local_searches": "rlnCryodaskLocalSearches",
    "sigma_ang": "rlnCryodaskSigmaAngles",
    "coarse_size": "rlnCryodaskCoarseImageSize",
    "do_join_random_halves": "rlnCryodaskJoinRandomHalves",
    "has_fine_enough_angular_sampling": "rlnCryodaskFineEnoughAngularSampling",
    "solvent_mask": "rlnSolventMaskName",
    "do_skip_align": "rlnDoSkipAlign",
    "subtract_map": "rlnCryodaskSignalSubtractionMap",
    "auto_focus_iter": "rlnCryodaskAutoFocusIterations",
}

_SAMPLING: dict[str, str] = {
    "healpix_order": "rlnHealpixOrder",
    "sym": "rlnSymmetryGroup",
    "limit_tilt": "rlnTiltAngleLimit",
    "psi_step": "rlnPsiStep",
    "offset_range": "rlnOffsetRange",
    "offset_step": "rlnOffsetStep",
    "random_perturbation": "rlnSamplingPerturbInstance",
    "perturbation_factor": "rlnSamplingPerturbFactor",
    "healpix_order_original": "rlnHealpixOrderOriginal",
    "psi_step_original": "rlnPsiStepOriginal",
    "offset_range_original": "rlnOffsetRangeOriginal",
    "offset_step_original": "rlnOffsetStepOriginal",
}


def _out(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    return v


def _typed(name: str, raw: Any, path: Path, label: str) -> Any:
    kind = {f.name: f.type for f in fields(OptimiserState)}[name]
    try:
        if kind == "bool":
            return bool(int(float(raw)))
        if kind == "int":
            return int(float(raw))
        if kind == "float":
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise UserError(where(path, field=label), f"{raw!r} is not a valid value; give a file written by "
                                                  "cryodask") from None


def write_optimiser(path: str | os.PathLike[str], state: OptimiserState, *, command_line: str = "",
                    model_files: str = "", data_file: str = "", sampling_file: str = "") -> None:
    """Write ``_optimiser.star``: the command line as the first comment, then ``data_optimiser_general``."""
    pairs: dict[str, Any] = {"rlnOutputRootName": state.output_root}
    pairs["rlnModelStarFile"] = model_files or "None"
    pairs["rlnExperimentalDataStarFile"] = data_file or "None"
    pairs["rlnOrientSamplingStarFile"] = sampling_file or "None"
    for name, label in _LABELS.items():
        if name != "output_root":
            pairs[label] = _out(getattr(state, name))
    # the command line is the first comment line, as in RELION's files
    with atomic_path(path) as tmp:
        write_star(tmp, {"optimiser_general": pairs})
        body = tmp.read_bytes()
        head = f"# {' '.join(command_line.splitlines())}\n" if command_line else ""
        tmp.write_bytes(head.encode() + body)


_OFFSET_LABELS = ("rlnOffsetRange", "rlnOffsetStep", "rlnOffsetRangeOriginal", "rlnOffsetStepOriginal")
# cryodask's marker for a _sampling.star whose offsets are in pixels (written without a pixel size)
_PIXEL_MARKER = "rlnCryodaskOffsetsInPixels"


def write_sampling(path: str | os.PathLike[str], state: OptimiserState, pixel_size: float | None = None, *,
                   is_3d: bool = True) -> None:
    """Write ``_sampling.star`` (``data_sampling_general``, RELION's labels), atomically.

    ``state`` holds the offset range and step in pixels. With ``pixel_size`` (Å/px) they are
    written in Å, as RELION 3.1 writes them; without it they stay in pixels and the file says
    so (``rlnCryodaskOffsetsInPixels 1``), so that :func:`read_sampling` reads them back right.
    ``is_3d`` gives ``rlnIs3DSampling`` (0 for 2D classification).
    """
    if pixel_size is not None and not (np.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel_size must be positive, not {pixel_size}")
    pairs: dict[str, Any] = {"rlnIs3DSampling": int(bool(is_3d)), "rlnIs3DTranslationalSampling": 0}
    for name, label in _SAMPLING.items():
        v = _out(getattr(state, name))
        if label in _OFFSET_LABELS and pixel_size is not None:
            v = float(v) * float(pixel_size)
        pairs[label] = v
    pairs["rlnHelicalOffsetStep"] = -1.0
    if pixel_size is None:
        pairs[_PIXEL_MARKER] = 1
    write_star(path, {"sampling_general": pairs})


def _pairs(path: Path, block: str) -> dict[str, Any]:
    blocks = read_star(path)
    if block not in blocks:
        raise UserError(path, f"has no data_{block} block; give a file written by cryodask or RELION")
    b = blocks[block]
    return b if isinstance(b, dict) else dict(b.attrs.get("pairs", {}))


def command_line_of(path: str | os.PathLike[str]) -> str:
    """The command line stored in the first comment lines of an ``_optimiser.star``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            s = line.strip()
            if not s.startswith("#"):
                if s:
                    break
                continue
            body = s[1:].strip()
            if body.startswith("version") or body.startswith("RELION optimiser"):
                continue
            return body
    return ""


def read_sampling(path: str | os.PathLike[str], state: OptimiserState,
                  pixel_size: float | None = None) -> OptimiserState:
    """Fill the sampling fields of ``state`` from a ``_sampling.star``; offsets end in pixels.

    RELION 3.1 writes the offset range and step in Å: they are divided by ``pixel_size``
    (Å/px). A file that :func:`write_sampling` wrote in pixels is read as it is. Without
    ``pixel_size`` an Å file is a :class:`UserError`.
    """
    path = Path(path)
    pairs = _pairs(path, "sampling_general")
    in_pixels = bool(int(float(pairs.get(_PIXEL_MARKER, 0) or 0)))
    if not in_pixels and pixel_size is None and any(label in pairs for label in _OFFSET_LABELS):
        raise UserError(path, "holds offsets in Å and the pixel size is unknown; keep the _model.star that the "
                              "_optimiser.star names beside it (its rlnPixelSize gives the pixel size)")
    for name, label in _SAMPLING.items():
        if label in pairs:
            v = _typed(name, pairs[label], path, label)
            if label in _OFFSET_LABELS and not in_pixels:
                v = float(v) / float(pixel_size)
            setattr(state, name, v)
    return state


def _model_pixel_size(files: dict[str, Any], optimiser: Path) -> float | None:
    """rlnPixelSize of the (first) _model.star an optimiser file names, or None when it cannot be read."""
    names = files["model"].split()
    model = _resolve(names[0], optimiser) if names else None
    if model is None:
        return None
    try:
        blocks = read_star(model, blocks=["model_general"])
    except (OSError, ValueError, UserError):
        return None
    g = blocks.get("model_general")
    if g is None:
        return None
    pairs = g if isinstance(g, dict) else dict(g.attrs.get("pairs", {}))
    try:
        v = float(pairs.get("rlnPixelSize", "nan"))
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def read_optimiser(path: str | os.PathLike[str], pixel_size: float | None = None
                   ) -> tuple[OptimiserState, dict[str, Any]]:
    """Restore the state of ``--continue <o>_itNNN_optimiser.star``.

    Returns the state (its sampling fields read from the ``_sampling.star`` it names, when
    that exists, offsets in pixels: RELION's Å are divided by ``pixel_size``, by default the
    ``rlnPixelSize`` of the ``_model.star`` the optimiser file names) and ``{"command_line", "model", "data", "sampling"}`` (file names as
    written; ``model`` may list several files separated by spaces, one per half-set).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "does not exist; give the _optimiser.star of the iteration to continue from")
    pairs = _pairs(path, "optimiser_general")
    state = OptimiserState()
    for name, label in _LABELS.items():
        if label in pairs:
            setattr(state, name, _typed(name, pairs[label], path, label))
    files = {"command_line": command_line_of(path), "model": str(pairs.get("rlnModelStarFile", "")),
             "data": str(pairs.get("rlnExperimentalDataStarFile", "")),
             "sampling": str(pairs.get("rlnOrientSamplingStarFile", ""))}
    sampling = _resolve(files["sampling"], path)
    if sampling is not None:
        read_sampling(sampling, state, pixel_size if pixel_size is not None else _model_pixel_size(files, path))
    return state, files


def _resolve(name: str, optimiser: Path) -> Path | None:
    """A file named in an optimiser file: as given (relative to the working folder), else beside it."""
    if not name or name == "None":
        return None
    p = Path(name)
    if p.is_file():
        return p
    q = optimiser.parent / p.name
    return q if q.is_file() else None


def resolve_file(name: str, optimiser: str | os.PathLike[str]) -> Path:
    """Like :func:`_resolve`, raising a :class:`UserError` when the file is missing."""
    p = _resolve(name, Path(optimiser))
    if p is None:
        raise UserError(optimiser, f"names {name}, which does not exist (looked as given and beside this file)")
    return p


def split_command_line(line: str) -> list[str]:
    """Tokens of a stored command line (``shlex`` rules)."""
    return shlex.split(line)
