"""Pick the series the lung model can read and assemble its Hounsfield-unit volume.

A study holds localisers, several reconstructions, maybe dose reports; the model wants one
axial CT stack. The series with the most axial CT slices (at least ``dicom_min_slices``) wins;
slices are ordered by their position along the slice normal, not by Instance Number, which
modalities do not always number in space order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom

from workers.dicom.preprocess import GRID, FloatArray, resample, to_hounsfield

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class SliceRef:
    path: Path
    header: pydicom.Dataset  # read without pixel data
    position: float  # along the slice normal, mm


@dataclass(frozen=True)
class Selected:
    series_uid: str
    slices: tuple[SliceRef, ...]  # sorted along the patient axis


@dataclass(frozen=True)
class NotApplicable:
    reason: str


def _normal(header: pydicom.Dataset) -> npt.NDArray[np.float64] | None:
    iop = header.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 0 else None


def read_headers(paths: list[Path]) -> list[tuple[Path, pydicom.Dataset]]:
    return [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]


def choose_series(
    headers: list[tuple[Path, pydicom.Dataset]], min_slices: int
) -> Selected | NotApplicable:
    """The best axial CT series of a study, or why the model cannot be applied to it."""
    modalities = sorted({str(h.get("Modality", "?")) for _, h in headers})
    by_series: dict[str, list[SliceRef]] = {}
    for path, h in headers:
        if str(h.get("Modality", "")) != "CT" or str(h.SOPClassUID) != CT_IMAGE_STORAGE:
            continue
        normal = _normal(h)
        ipp = h.get("ImagePositionPatient")
        if normal is None or ipp is None or abs(normal[2]) < 0.9:  # not axial
            continue
        position = float(np.dot(np.asarray(ipp, float), normal))
        by_series.setdefault(str(h.SeriesInstanceUID), []).append(SliceRef(path, h, position))
    if not by_series:
        return NotApplicable(
            f"no axial single-frame CT in the study (modalities: {', '.join(modalities)}); "
            "the lung model reads axial chest CT only"
        )
    best_uid, best = max(by_series.items(), key=lambda kv: len({s.position for s in kv[1]}))
    unique: dict[float, SliceRef] = {}
    for s in sorted(best, key=lambda s: (s.position, int(s.header.get("InstanceNumber", 0) or 0))):
        unique.setdefault(round(s.position, 3), s)
    slices = tuple(unique.values())
    shapes = {(int(s.header.Rows), int(s.header.Columns)) for s in slices}
    if len(slices) < min_slices:
        return NotApplicable(
            f"the largest axial CT series has {len(slices)} slices; the lung model needs at "
            f"least {min_slices}"
        )
    if len(shapes) != 1:
        return NotApplicable(f"slices of the series differ in size: {sorted(shapes)}")
    return Selected(best_uid, slices)


def slice_hu(path: Path) -> FloatArray:
    """One slice's pixels in Hounsfield units (compressed syntaxes decoded by pylibjpeg)."""
    ds = pydicom.dcmread(path)
    return to_hounsfield(
        ds.pixel_array,
        float(ds.get("RescaleSlope", 1) or 1),
        float(ds.get("RescaleIntercept", 0) or 0),
    )


def in_plane_volume(selected: Selected) -> FloatArray:
    """The series resampled in-plane to the model grid, slice by slice (bounded memory)."""
    out = np.empty((len(selected.slices), *GRID[1:]), dtype=np.float32)
    for i, s in enumerate(selected.slices):
        out[i] = resample(slice_hu(s.path), GRID[1:])
    return out
