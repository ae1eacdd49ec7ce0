"""The DICOM result objects: a TID 1500 SR and a key-slice Secondary Capture, in the source study.

The source is a 20-slice CT series made in memory from pydicom's ``CT_small.dcm``; the SR is
built from header-only copies (as the worker passes them) and everything is checked after a
save/read round trip, by pydicom, highdicom's parser and DCMTK.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from tests.dicom_data import dcmtk, series_datasets
from workers.dicom.outputs import (
    COLOUR_ABOVE,
    COLOUR_BELOW,
    LESION_PROBABILITY,
    NODULE_LIKE_LESION,
    PATIENT_STUDY_KEYWORDS,
    RESULT_VERSION,
    SLICE_SCORE,
    TOP_SLICES,
    LungCtResult,
    build_key_slice_image,
    build_structured_report,
    most_suspicious_index,
)
from workers.dicom.preprocess import lung_window

N_SLICES = 20
ARGMAX = 13  # the most suspicious slice: neither the first nor the last


@pytest.fixture(scope="module")
def ct_series() -> list[pydicom.Dataset]:
    """Twenty CT slices of one series, sorted along z, each with its own SOP Instance UID."""
    return series_datasets(N_SLICES, shuffle=False, step_mm=5.0)


@pytest.fixture(scope="module")
def headers(ct_series: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The same slices without pixel data, as the worker hands them over."""
    out = []
    for ds in ct_series:
        h = copy.deepcopy(ds)
        del h.PixelData
        out.append(h)
    return out


@pytest.fixture(scope="module")
def hu_slice(ct_series: list[pydicom.Dataset]) -> np.ndarray:
    """Hounsfield units of the most suspicious slice."""
    ds = ct_series[ARGMAX]
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu.astype(np.float32)


def make_result(probability: float = 0.8, top_score: float = 0.93) -> LungCtResult:
    """Scores that rise and fall with a single clear peak at :data:`ARGMAX`."""
    scores = [round(0.05 + 0.01 * i, 3) for i in range(N_SLICES)]  # all below 0.25
    scores[ARGMAX] = top_score
    return LungCtResult(
        study_probability=probability,
        slice_scores=tuple(scores),
        model_name="lung_ct_cnn",
        model_version="1",
        result_version=3,
    )


def save_and_read(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def refs(items: list[hd.sr.SourceImageForMeasurementGroup]) -> list[tuple[str, str]]:
    return [(i.referenced_sop_class_uid, i.referenced_sop_instance_uid) for i in items]


def text_values(sr: pydicom.Dataset, name: object) -> list[str]:
    items = hd.sr.utils.find_content_items(sr, name=name, value_type="TEXT", recursive=True)
    return [str(i.TextValue) for i in items]


def test_most_suspicious_index_is_the_argmax() -> None:
    assert most_suspicious_index(make_result()) == ARGMAX
    tie = LungCtResult(0.5, (0.1, 0.7, 0.7, 0.2), "m", "1", 1)
    assert most_suspicious_index(tie) == 1
    with pytest.raises(ValueError):
        most_suspicious_index(LungCtResult(0.5, (), "m", "1", 1))


def test_sr_round_trip_in_source_study(headers: list[pydicom.Dataset], tmp_path: Path) -> None:
    sr = build_structured_report(
        headers, make_result(), series_number=901, instance_number=2, institution="General"
    )
    back = save_and_read(sr, tmp_path / "sr.dcm")
    source = headers[0]

    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPClassUID == Comprehensive3DSRStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.SOPInstanceUID not in {h.SOPInstanceUID for h in headers}
    assert (back.SeriesNumber, back.InstanceNumber) == (901, 2)
    assert back.Modality == "SR"
    assert back.InstitutionName == "General"
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert back.get(keyword) == source.get(keyword), keyword
    assert back.PatientName == "CompressedSamples^CT1"  # a real value, not both empty
    assert "not for clinical use" in back.SeriesDescription.lower()


def test_sr_references_every_slice(headers: list[pydicom.Dataset], tmp_path: Path) -> None:
    back = save_and_read(
        build_structured_report(headers, make_result(), series_number=9), tmp_path / "sr.dcm"
    )
    expected = {(h.SOPClassUID, h.SOPInstanceUID) for h in headers}

    evidence = back.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == headers[0].StudyInstanceUID
    (series,) = evidence[0].ReferencedSeriesSequence
    assert series.SeriesInstanceUID == headers[0].SeriesInstanceUID
    got = {
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence
    }
    assert got == expected

    study_group = hd.sr.Comprehensive3DSR.from_dataset(back).content.get_image_measurement_groups()[
        0
    ]
    assert set(refs(study_group.source_images)) == expected


@pytest.mark.parametrize(
    ("probability", "finding"),
    [(0.8, codes.SCT.Present), (0.2, codes.SCT.Absent), (0.5, codes.SCT.Absent)],
)
def test_sr_probability_and_finding(
    headers: list[pydicom.Dataset], tmp_path: Path, probability: float, finding: object
) -> None:
    sr = build_structured_report(headers, make_result(probability), series_number=9)
    report = hd.sr.srread(_save(sr, tmp_path / "sr.dcm")).content
    study_group = report.get_image_measurement_groups()[0]

    assert study_group.finding_type == NODULE_LIKE_LESION
    assert [s.value for s in study_group.finding_sites] == [codes.SCT.Lung]
    (measurement,) = study_group.get_measurements(name=LESION_PROBABILITY)
    assert measurement.value == pytest.approx(probability)
    assert (
        measurement.unit.value == "{probability}" and measurement.unit.scheme_designator == "UCUM"
    )
    (evaluation,) = study_group.get_qualitative_evaluations(name=NODULE_LIKE_LESION)
    assert evaluation.value == finding


def test_sr_names_algorithm_version_and_result_version(
    headers: list[pydicom.Dataset], tmp_path: Path
) -> None:
    back = save_and_read(
        build_structured_report(headers, make_result(), series_number=9), tmp_path / "sr.dcm"
    )

    assert set(text_values(back, codes.DCM.AlgorithmName)) == {"lung_ct_cnn"}
    assert set(text_values(back, codes.DCM.AlgorithmVersion)) == {"1"}
    assert text_values(back, RESULT_VERSION) == ["3"]
    (comment,) = text_values(back, codes.DCM.Comment)
    assert "not for clinical use" in comment.lower() and "reference model" in comment.lower()
    schemes = {item.CodingSchemeDesignator for item in back.CodingSchemeIdentificationSequence}
    assert "99MEDBATCH" in schemes


def test_sr_top_slices_reference_their_images(
    headers: list[pydicom.Dataset], tmp_path: Path
) -> None:
    result = make_result()
    back = save_and_read(
        build_structured_report(headers, result, series_number=9), tmp_path / "sr.dcm"
    )
    slice_groups = hd.sr.Comprehensive3DSR.from_dataset(
        back
    ).content.get_image_measurement_groups()[1:]

    assert len(slice_groups) == TOP_SLICES
    order = np.argsort(-np.asarray(result.slice_scores), kind="stable")[:TOP_SLICES]
    for group, idx in zip(slice_groups, order, strict=True):
        (measurement,) = group.get_measurements(name=SLICE_SCORE)
        assert measurement.value == pytest.approx(result.slice_scores[idx])
        assert refs(group.source_images) == [
            (headers[idx].SOPClassUID, headers[idx].SOPInstanceUID)
        ]
    first = slice_groups[0]
    assert refs(first.source_images)[0][1] == headers[ARGMAX].SOPInstanceUID
    assert first.tracking_identifier == "slice rank 1 (instance 14)"


def test_sr_does_not_share_elements_with_the_source(headers: list[pydicom.Dataset]) -> None:
    sr = build_structured_report(headers, make_result(), series_number=9)
    sr.PatientName = "Changed^Later"
    assert headers[0].PatientName == "CompressedSamples^CT1"


def test_sr_rejects_scores_that_do_not_match_the_slices(headers: list[pydicom.Dataset]) -> None:
    with pytest.raises(ValueError, match="slice scores"):
        build_structured_report(headers[:-1], make_result(), series_number=9)


@pytest.mark.parametrize(("top_score", "colour"), [(0.93, COLOUR_ABOVE), (0.4, COLOUR_BELOW)])
def test_key_slice_image(
    headers: list[pydicom.Dataset],
    hu_slice: np.ndarray,
    tmp_path: Path,
    top_score: float,
    colour: tuple[int, int, int],
) -> None:
    result = make_result(top_score=top_score)
    sc = build_key_slice_image(headers, hu_slice, result, series_number=902, instance_number=1)
    back = save_and_read(sc, tmp_path / "sc.dcm")
    source = headers[ARGMAX]

    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert back.get(keyword) == source.get(keyword), keyword
    assert "reference model" in back.SeriesDescription.lower()
    assert back.BurnedInAnnotation == "NO"  # a frame and a bar, no identifying text
    assert back.PatientOrientation == ["L", "P"]
    (ref,) = back.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID

    pixels = back.pixel_array
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert pixels.shape == (*hu_slice.shape, 3) and pixels.dtype == np.uint8
    assert len(set(colour)) > 1  # not a grey level: a windowed CT pixel can never match it
    overlay = np.all(pixels == np.asarray(colour, dtype=np.uint8), axis=-1)
    assert overlay[0, :].all() and overlay[:, 0].all()  # the frame
    assert overlay.sum() > 4 * hu_slice.shape[0]  # frame plus the filled part of the bar
    # Inside the frame and left of the bar: the lung-windowed slice, untouched and grey.
    inner = pixels[8:-8, 8:-16]
    expected = np.rint(lung_window(hu_slice) * 255.0).astype(np.uint8)[8:-8, 8:-16]
    np.testing.assert_array_equal(inner[..., 0], expected)
    assert (inner[..., 0] == inner[..., 1]).all() and (inner[..., 1] == inner[..., 2]).all()


def test_key_slice_image_rejects_a_volume(
    headers: list[pydicom.Dataset], hu_slice: np.ndarray
) -> None:
    with pytest.raises(ValueError, match="2-D"):
        build_key_slice_image(headers, hu_slice[np.newaxis], make_result(), series_number=9)


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dcmtk_parses_both_files(
    headers: list[pydicom.Dataset], hu_slice: np.ndarray, tmp_path: Path
) -> None:
    result = make_result()
    sr_path = _save(build_structured_report(headers, result, series_number=9), tmp_path / "sr.dcm")
    sc_path = _save(
        build_key_slice_image(headers, hu_slice, result, series_number=10), tmp_path / "sc.dcm"
    )
    dcmdump = dcmtk("dcmdump")
    for path in (sr_path, sc_path):
        run = subprocess.run([dcmdump, str(path)], capture_output=True, text=True, timeout=60)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output
        assert "error" not in output.lower(), output
    # dsrdump also checks the SR content tree against the IOD's relationship constraints.
    run = subprocess.run(
        [dcmtk("dsrdump"), str(sr_path)], capture_output=True, text=True, timeout=60
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "error" not in output.lower() and "warn" not in output.lower(), output
    assert "Nodule-like lesion probability" in output
