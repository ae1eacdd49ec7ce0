"""CT volume → the fixed input grid of the ``lung_ct_cnn`` Triton model (numpy only).

One function, :func:`model_input`, feeds both training (``triton_models/lung_ct_cnn/train.py``)
and serving (``workers/dicom/tasks.py``), so the model never sees a volume prepared two ways.

Steps: stored pixel values → Hounsfield units (rescale slope/intercept) → linear resampling of
the whole scanned range to :data:`GRID` (slices, rows, columns) → lung window
(:data:`WINDOW_CENTER_HU` / :data:`WINDOW_WIDTH_HU`) scaled to [0, 1].

The model answers one score per grid slice; :func:`source_slice_scores` maps them back to the
slices that were actually acquired, so a radiologist is pointed at a real image.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Model input grid: slices (feet → head order of the sorted series), rows, columns.
GRID: tuple[int, int, int] = (64, 128, 128)
#: Lung window: what radiologists use to read parenchyma and nodules.
WINDOW_CENTER_HU = -600.0
WINDOW_WIDTH_HU = 1500.0

FloatArray = npt.NDArray[np.float32]


def to_hounsfield(stored: npt.NDArray[np.generic], slope: float, intercept: float) -> FloatArray:
    """Stored pixel values of one slice (or a stack) in Hounsfield units."""
    return (stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(
        np.float32, copy=False
    )


def lung_window(hu: npt.NDArray[np.floating]) -> FloatArray:
    """HU → [0, 1] through the lung window (clipped at both ends)."""
    low = WINDOW_CENTER_HU - WINDOW_WIDTH_HU / 2
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(WINDOW_WIDTH_HU)
    return np.clip(out, 0.0, 1.0, out=out)


def _resample_axis(a: FloatArray, axis: int, size: int) -> FloatArray:
    """Linear interpolation of ``a`` along one axis to ``size`` samples (end points aligned)."""
    n = a.shape[axis]
    if n == size:
        return a
    if n == 1:
        return np.repeat(a, size, axis=axis)
    pos = np.linspace(0.0, n - 1, size, dtype=np.float64)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    w_shape = [1] * a.ndim
    w_shape[axis] = size
    w = (pos - lo).astype(np.float32).reshape(w_shape)
    return (np.take(a, lo, axis=axis) * (1 - w) + np.take(a, hi, axis=axis) * w).astype(
        np.float32, copy=False
    )


def resample(volume: npt.NDArray[np.floating], shape: tuple[int, ...] = GRID) -> FloatArray:
    """Separable linear resampling of a (slices, rows, columns) volume to ``shape``."""
    out = np.asarray(volume, dtype=np.float32)
    if out.ndim != len(shape):
        raise ValueError(f"volume has {out.ndim} dimensions, expected {len(shape)}")
    for axis, size in enumerate(shape):
        out = _resample_axis(out, axis, size)
    return out


def model_input(hu_volume: npt.NDArray[np.floating]) -> FloatArray:
    """A sorted HU volume (slices, rows, columns) as the model's float32 [64, 128, 128] input."""
    return lung_window(resample(hu_volume, GRID))


def source_slice_scores(grid_scores: npt.NDArray[np.floating], n_source: int) -> FloatArray:
    """Per-grid-slice scores interpolated back onto the ``n_source`` acquired slices."""
    scores = np.asarray(grid_scores, dtype=np.float32).reshape(-1)
    if n_source < 1:
        raise ValueError("a series has at least one slice")
    return _resample_axis(scores, 0, n_source)
