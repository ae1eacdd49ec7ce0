"""The synthetic chest-CT generator: determinism, Hounsfield ranges, lesion bookkeeping and the
DICOM writer (round trip through pydicom back to the same HU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from medbatch.synth.lung_ct import LESION_DIAMETER_MM, THICKNESSES_MM, synth_volume, write_series
from workers.dicom.preprocess import model_input, to_hounsfield

SMALL = {"rows": 96, "cols": 96}


def test_same_seed_same_volume() -> None:
    a = synth_volume(11, 30, nodules=2, **SMALL)
    b = synth_volume(11, 30, nodules=2, **SMALL)
    assert np.array_equal(a.hu, b.hu)
    assert a.spacing_mm == b.spacing_mm
    assert a.nodule_slices == b.nodule_slices
    assert a.lesions == b.lesions
    c = synth_volume(12, 30, nodules=2, **SMALL)
    assert not np.array_equal(a.hu, c.hu)


def test_shape_dtype_spacing_and_hu_ranges() -> None:
    ct = synth_volume(3, 48)
    assert ct.hu.dtype == np.int16 and ct.hu.shape == (48, 256, 256)
    thickness, row_mm, col_mm = ct.spacing_mm
    assert thickness in THICKNESSES_MM
    assert row_mm == col_mm and 1.0 < row_mm < 2.5  # a 270..500 mm field of view
    assert 150 < 48 * thickness < 450  # the scan covers a chest
    hu = ct.hu.astype(np.float32)
    assert hu.min() >= -1024 and hu.max() <= 3071
    # image corners: air
    assert abs(float(np.median(hu[:, :8, :8])) + 1000) < 40
    # a mid-chest slice holds air, lung, fat, soft tissue and bone
    mid = hu[24]
    for lo, hi, share in (
        (-1100, -950, 0.05),
        (-950, -750, 0.05),
        (-160, -40, 0.01),
        (-30, 120, 0.08),
        (300, 3071, 0.002),
    ):
        assert ((mid >= lo) & (mid < hi)).mean() > share, (lo, hi)


def test_noise_level_in_air() -> None:
    ct = synth_volume(5, 20, **SMALL)
    corner = ct.hu[:, :6, :6].astype(np.float32)
    sd = float(corner[corner > -1020].std())  # values below -1024 were clipped
    assert 8 < sd < 45


def test_negative_volume_has_no_lesion() -> None:
    ct = synth_volume(21, 40, nodules=0, **SMALL)
    assert ct.label == 0 and ct.nodule_slices == frozenset() and ct.lesions == ()


def test_lesions_are_recorded_consistently() -> None:
    ct = synth_volume(8, 60, nodules=3)
    assert ct.label == 1 and 1 <= len(ct.lesions) <= 3
    n, rows, cols = ct.hu.shape
    thickness, pixel, _ = ct.spacing_mm
    assert all(0 <= i < n for i in ct.nodule_slices)
    covered: set[int] = set()
    for lesion in ct.lesions:
        lo, hi = LESION_DIAMETER_MM
        assert lo <= lesion.diameter_mm <= hi
        assert lesion.kind in ("solid", "part-solid", "ground-glass")
        z, y, x = lesion.center_mm
        i = round(z / thickness)
        r = round(y / pixel + (rows - 1) / 2)
        c = round(x / pixel + (cols - 1) / 2)
        assert i in ct.nodule_slices
        centre = ct.hu[i, r - 1 : r + 2, c - 1 : c + 2].astype(np.float32)
        assert abs(float(centre.mean()) - lesion.hu) < 60  # noise averages down
        half = lesion.diameter_mm / 2 * 1.25  # ellipsoid axes and lobulation
        covered.update(j for j in range(n) if abs(j * thickness - z) <= half + thickness / 2)
    # every recorded slice is within reach of some lesion
    assert ct.nodule_slices <= covered


def test_random_nodule_count_is_about_half_positive() -> None:
    labels = [synth_volume(seed, 16, rows=48, cols=48).label for seed in range(24)]
    assert 6 <= sum(labels) <= 18


def test_slice_thickness_follows_slice_count() -> None:
    thin = synth_volume(4, 250, rows=48, cols=48, nodules=0)
    thick = synth_volume(4, 40, rows=48, cols=48, nodules=0)
    assert thin.spacing_mm[0] < thick.spacing_mm[0]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        synth_volume(-1, 10)
    with pytest.raises(ValueError):
        synth_volume(1, 0)
    with pytest.raises(ValueError):
        synth_volume(1, 10, nodules=-1)


def _read(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def test_dicom_round_trip(tmp_path: Path) -> None:
    ct = synth_volume(9, 12, nodules=1, **SMALL)
    paths = write_series(
        ct,
        tmp_path / "series",
        patient_id="SYN-0009",
        patient_name="Synthetic^Nine",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        series_uid="1.2.826.0.1.3680043.8.498.2",
    )
    assert [p.name for p in paths] == [f"{i + 1:04d}.dcm" for i in range(12)]
    datasets = _read(paths)
    hu = np.stack(
        [
            to_hounsfield(ds.pixel_array, float(ds.RescaleSlope), float(ds.RescaleIntercept))
            for ds in datasets
        ]
    )
    assert np.array_equal(hu, ct.hu.astype(np.float32))
    np.testing.assert_array_equal(model_input(hu), model_input(ct.hu))

    thickness, pixel, _ = ct.spacing_mm
    sop_uids = set()
    for i, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"
        assert ds.Manufacturer == "medbatch synthetic"
        assert ds.PatientID == "SYN-0009" and str(ds.PatientName) == "Synthetic^Nine"
        assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1"
        assert ds.SeriesInstanceUID == "1.2.826.0.1.3680043.8.498.2"
        assert ds.InstanceNumber == i + 1
        assert ds.PixelRepresentation == 0 and ds.BitsAllocated == 16
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == -1024.0
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([pixel, pixel])
        assert float(ds.SliceThickness) == pytest.approx(thickness)
        assert ds.StudyDate and ds.StudyTime and ds.AccessionNumber
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == 12
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    np.testing.assert_allclose(np.diff(z), thickness, atol=1e-3)  # feet → head


def test_dicom_fresh_uids_and_other_intercept(tmp_path: Path) -> None:
    ct = synth_volume(2, 3, rows=40, cols=40)
    first = _read(write_series(ct, tmp_path / "a", patient_id="P", patient_name="A^B"))
    second = _read(
        write_series(
            ct, tmp_path / "b", patient_id="P", patient_name="A^B", rescale_intercept=-2048.0
        )
    )
    assert first[0].StudyInstanceUID != second[0].StudyInstanceUID
    assert first[0].SeriesInstanceUID != second[0].SeriesInstanceUID
    assert len({ds.StudyInstanceUID for ds in first}) == 1
    stored = second[0].pixel_array.astype(np.int64)
    np.testing.assert_array_equal(stored - 2048, ct.hu[0])
    with pytest.raises(ValueError, match="does not fit"):
        write_series(ct, tmp_path / "c", patient_id="P", patient_name="A^B", rescale_intercept=0)
