"""Series selection and volume assembly from real DICOM files (pydicom's CT test slice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from tests.dicom_data import MR_SMALL, make_series
from workers.dicom.preprocess import GRID, lung_window, model_input, resample, source_slice_scores
from workers.dicom.sendback import Destination
from workers.dicom.series import (
    NotApplicable,
    Selected,
    choose_series,
    in_plane_volume,
    read_headers,
)


def test_the_largest_axial_ct_series_is_chosen_and_sorted_by_position(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    small = make_series(tmp_path / "a", 17, study_uid=study)
    big = make_series(tmp_path / "b", 20, study_uid=study)  # instance numbers reversed
    mr = make_series(tmp_path / "c", 30, study_uid=study, source=MR_SMALL)
    chosen = choose_series(read_headers(small + big + mr), min_slices=16)
    assert isinstance(chosen, Selected)
    assert chosen.series_uid == pydicom.dcmread(big[0]).SeriesInstanceUID
    positions = [s.position for s in chosen.slices]
    assert positions == sorted(positions) and len(positions) == 20
    volume = in_plane_volume(chosen)
    assert volume.shape == (20, *GRID[1:])
    raw = pydicom.dcmread(big[0])
    hu = raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    assert np.allclose(volume[0], resample(hu, GRID[1:]), atol=1e-3)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_slices_decode_to_the_same_hounsfield_units(tmp_path: Path, syntax: str) -> None:
    plain = read_headers(make_series(tmp_path / "plain", 16, study_uid="1.2.3.4"))
    packed = read_headers(make_series(tmp_path / "packed", 16, transfer_syntax=syntax))
    a, b = choose_series(plain, 16), choose_series(packed, 16)
    assert isinstance(a, Selected) and isinstance(b, Selected)
    assert str(b.slices[0].header.file_meta.TransferSyntaxUID) == syntax
    assert np.array_equal(in_plane_volume(a), in_plane_volume(b))


def test_why_a_study_is_not_applicable(tmp_path: Path) -> None:
    few = choose_series(read_headers(make_series(tmp_path / "few", 5)), min_slices=16)
    assert isinstance(few, NotApplicable) and "5 slices" in few.reason
    mr = choose_series(read_headers(make_series(tmp_path / "mr", 20, source=MR_SMALL)), 16)
    assert isinstance(mr, NotApplicable) and "MR" in mr.reason


def test_preprocessing_windows_resamples_and_maps_scores_back() -> None:
    hu = np.full((40, 256, 256), -1000.0, dtype=np.float32)
    hu[:, 100:150, 100:150] = 40.0
    x = model_input(hu)
    assert x.shape == GRID and x.dtype == np.float32
    assert x.min() == pytest.approx(350 / 1500) and x.max() == pytest.approx(1390 / 1500)
    assert lung_window(np.array([-2000.0, -600.0, 3000.0])).tolist() == [0.0, 0.5, 1.0]
    scores = source_slice_scores(np.linspace(0, 1, GRID[0]), 40)
    assert scores.shape == (40,) and scores[0] == 0.0 and scores[-1] == pytest.approx(1.0)


def test_destination_parsing() -> None:
    assert Destination.parse("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    with pytest.raises(Exception, match="AE_TITLE@host:port"):
        Destination.parse("PACS:104")
