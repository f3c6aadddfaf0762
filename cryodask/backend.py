"""The array backend: NumPy on CPU, CuPy on GPU, chosen from the arrays themselves.

There is no global switch. A function that receives CuPy arrays computes on the
GPU; the same function given NumPy arrays computes on the CPU, so a CPU worker
and a GPU worker in one cluster each use their own.

FFTs follow RELION's normalisation: the forward transform divides by the number
of pixels (``norm="forward"``), the inverse does not.
"""

from __future__ import annotations

import mmap
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np


def array_module(*arrays: Any) -> ModuleType:
    """``numpy`` or ``cupy``, whichever the arrays live in (NumPy when none is a CuPy array)."""
    for a in arrays:
        if array_api_compat.is_cupy_array(a):
            import cupy

            return cupy
    return np


def namespace(*arrays: Any) -> Any:
    """The array-API namespace of the arrays (array-api-compat's wrapper of NumPy or CuPy)."""
    return array_api_compat.array_namespace(*arrays)


def is_gpu(*arrays: Any) -> bool:
    return array_module(*arrays) is not np


def fft_module(*arrays: Any) -> ModuleType:
    """``scipy.fft`` for NumPy arrays, ``cupyx.scipy.fft`` for CuPy arrays."""
    if is_gpu(*arrays):
        import cupyx.scipy.fft as cufft

        return cufft
    import scipy.fft

    return scipy.fft


def _fft_kwargs(x: Any, workers: int | None) -> dict[str, Any]:
    return {} if is_gpu(x) or workers is None else {"workers": workers}


def rfftn(x: Any, axes: tuple[int, ...], workers: int | None = None) -> Any:
    """Real-to-complex FFT over ``axes`` divided by the number of pixels (RELION's convention)."""
    return fft_module(x).rfftn(x, axes=axes, norm="forward", **_fft_kwargs(x, workers))


def irfftn(f: Any, shape: tuple[int, ...], axes: tuple[int, ...], workers: int | None = None) -> Any:
    """Inverse of :func:`rfftn` (no division)."""
    return fft_module(f).irfftn(f, s=shape, axes=axes, norm="forward", **_fft_kwargs(f, workers))


def fftn(x: Any, axes: tuple[int, ...], workers: int | None = None) -> Any:
    """Complex FFT divided by the number of pixels."""
    return fft_module(x).fftn(x, axes=axes, norm="forward", **_fft_kwargs(x, workers))


def ifftn(f: Any, axes: tuple[int, ...], workers: int | None = None) -> Any:
    return fft_module(f).ifftn(f, axes=axes, norm="forward", **_fft_kwargs(f, workers))


def real_dtype(double: bool = False) -> np.dtype:
    """float32 by default, float64 with ``--double``."""
    return np.dtype(np.float64 if double else np.float32)


def complex_dtype(double: bool = False) -> np.dtype:
    return np.dtype(np.complex128 if double else np.complex64)


def scatter_add(target: Any, flat_index: Any, values: Any) -> Any:
    """``target.ravel()[flat_index] += values`` with repeated indices summed; returns ``target``.

    ``target`` must be contiguous. On NumPy this uses ``bincount`` (much faster
    than ``np.add.at``); on CuPy ``cupyx.scatter_add``.
    """
    xp = array_module(target)
    flat = target.reshape(-1)
    if xp is np:
        n = flat.shape[0]
        idx = np.asarray(flat_index).reshape(-1)
        vals = np.asarray(values).reshape(-1)
        if np.iscomplexobj(flat):
            flat += (np.bincount(idx, weights=vals.real, minlength=n)
                     + 1j * np.bincount(idx, weights=vals.imag, minlength=n)).astype(flat.dtype)
        else:
            flat += np.bincount(idx, weights=vals, minlength=n).astype(flat.dtype)
    else:
        import cupyx

        cupyx.scatter_add(flat, flat_index.reshape(-1), values.reshape(-1))
    return target


def to_numpy(x: Any) -> np.ndarray:
    """Copy to host memory (no copy for NumPy arrays)."""
    if is_gpu(x):
        return x.get()
    return np.asarray(x)


def to_device(x: Any, like: Any) -> Any:
    """Move ``x`` to the device of ``like`` (host for NumPy, the current GPU for CuPy)."""
    xp = array_module(like)
    return xp.asarray(x)


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA errors when no driver is present
        return False


def huge_page_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros in memory advised for transparent huge pages (Linux; plain ``np.zeros`` elsewhere).

    For large, long-lived arrays read at scattered addresses (a projector's map, read by the slice
    gathers): with 4 KiB pages many samples of a slice miss the TLB (measured: 36-42 against 27-30 ns a
    sample for a slice gather at box 128, pad 2). Backprojector sums, made afresh for every task, gained
    nothing measurable (their huge-page faults cost what the TLB saved), so they stay on NumPy's. Workers do not advise
    huge pages for NumPy's other arrays (``NUMPY_MADVISE_HUGEPAGE=0``, see
    :data:`cryodask.cluster.local.MEMORY_ENVIRON`), whose page faults would then stall on compaction
    at every task.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < (4 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled by the kernel
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # kernels without THP
        pass
    return np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)
