"""The ``lung_ct_cnn`` result as DICOM objects that go back to the PACS (built with highdicom).

Two objects per scored series, both in the *source* study so the PACS files them next to the CT:

* a **Comprehensive 3D SR** holding a TID 1500 Measurement Report: one study-level measurement
  group (probability, "nodule-like lesion: present/absent", every source slice as source image)
  and one group per top-ranked slice (its score, referencing that slice). Comprehensive 3D SR is
  the IOD highdicom builds TID 1500 for and allows every relationship TID 1500 uses, so highdicom
  validates the tree while building it;
* a **Secondary Capture** (RGB) of the most suspicious slice in the lung window with a coloured
  score bar and frame burnt in: something a radiologist sees in any viewer, SR support or not.

Everything is built from header attributes (header-only datasets are fine); the pixels of the
key slice arrive separately as Hounsfield units. Neither object carries text in its pixels, so no
patient identifier is ever burnt in.

Codes: where DICOM/SNOMED/UCUM have a concept it is used (Finding Site = Lung, Present/Absent,
Algorithm Name/Version, Comment). The model's own outputs (lesion probability, slice score, the
"nodule-like lesion" finding and the result version) have no standard code that fits: SNOMED's
"Nodule" or DICOM's "Probability of cancer" would claim more than an unvalidated reference model
says. Those use the local scheme :data:`LOCAL_SCHEME` (``99`` prefix = private per PS3.16 8.2),
declared in the Coding Scheme Identification Sequence of the SR.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.spatial import get_closest_patient_orientation
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from workers.dicom.preprocess import WINDOW_CENTER_HU, WINDOW_WIDTH_HU, lung_window

#: Private coding scheme of this project (no standard code fits the model's outputs).
LOCAL_SCHEME = "99MEDBATCH"
#: Number of highest-scoring slices reported individually in the SR.
TOP_SLICES = 5
#: The one sentence every output carries, in the SR text and in both series descriptions.
DISCLAIMER = "Not for clinical use - output of a reference model, not a validated device."

# Local concepts (see module docstring for why they are not standard codes).
NODULE_LIKE_LESION = hd.sr.CodedConcept("LUNGCT-LESION", LOCAL_SCHEME, "Nodule-like lesion")
LESION_PROBABILITY = hd.sr.CodedConcept(
    "LUNGCT-PROB", LOCAL_SCHEME, "Nodule-like lesion probability"
)
SLICE_SCORE = hd.sr.CodedConcept("LUNGCT-SLICE", LOCAL_SCHEME, "Slice nodule-like lesion score")
RESULT_VERSION = hd.sr.CodedConcept("RESULT-VERSION", LOCAL_SCHEME, "Result version")
#: UCUM unit of a dimensionless probability (an annotation on the unity unit "1").
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "Probability")
#: TID 1500 row 12: container of report-level qualitative evaluations (CODE or TEXT items).
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

#: Overlay colours; none is grey, so a test (or a viewer) can tell the overlay from the image.
COLOUR_ABOVE = (255, 0, 0)  # slice score above the threshold
COLOUR_BELOW = (255, 191, 0)  # slice score at or below the threshold
COLOUR_TRACK = (0, 0, 96)  # empty part of the score bar
COLOUR_THRESHOLD = (0, 255, 255)  # tick at the threshold height

#: Patient and study attributes copied from the source into our objects (empty when absent).
PATIENT_STUDY_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

_LO_MAX = 64  # maximum length of a DICOM LO value (series description)


@dataclass(frozen=True)
class LungCtResult:
    """What the worker learnt about one series; the input of both DICOM builders."""

    study_probability: float  # 0..1
    slice_scores: tuple[float, ...]  # one per source slice, same order as `slices`
    model_name: str  # "lung_ct_cnn"
    model_version: str  # "1"
    result_version: int  # 1, 2, ... (a study re-opened by late instances gets a new version)
    threshold: float = 0.5  # probability above which the finding is "present"

    @property
    def finding_present(self) -> bool:
        """Strictly above the threshold: a probability equal to it does not raise a finding."""
        return self.study_probability > self.threshold


def most_suspicious_index(result: LungCtResult) -> int:
    """Index (into `slices`) of the highest slice score; the first one wins a tie."""
    if not result.slice_scores:
        raise ValueError("result has no slice scores")
    return int(np.argmax(np.asarray(result.slice_scores, dtype=np.float64)))


def _ranked_indices(result: LungCtResult) -> list[int]:
    """Slice indices by descending score, ties in series order (so rank 0 = argmax)."""
    scores = np.asarray(result.slice_scores, dtype=np.float64)
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def _check(slices: Sequence[pydicom.Dataset], result: LungCtResult) -> None:
    """Reject inputs that would produce a report pointing at the wrong images."""
    if not slices:
        raise ValueError("no source slices")
    if len(slices) != len(result.slice_scores):
        raise ValueError(f"{len(result.slice_scores)} slice scores for {len(slices)} slices")
    values = np.asarray([result.study_probability, result.threshold, *result.slice_scores])
    if not np.all(np.isfinite(values)):
        raise ValueError("probability, threshold and slice scores must be finite")
    if not 0.0 <= result.study_probability <= 1.0 or not 0.0 <= result.threshold <= 1.0:
        raise ValueError("probability and threshold must lie in [0, 1]")
    if result.result_version < 1:
        raise ValueError("result_version starts at 1")
    studies = {str(ds.StudyInstanceUID) for ds in slices}
    if len(studies) != 1:
        raise ValueError(f"slices come from {len(studies)} studies")


def _clip_lo(text: str) -> str:
    """A series description that fits the LO value representation."""
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def _header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Deep copy of a slice's header without pixels, type 2 patient/study attributes present.

    A copy because highdicom adds the source's data elements to the new object by reference:
    editing the SR later would otherwise edit the caller's CT dataset. The type 2 attributes
    because highdicom reads PatientID & co. straight off the first evidence item.
    """
    out = pydicom.Dataset()
    for elem in ds:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            out.add(copy.deepcopy(elem))
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def _algorithm(result: LungCtResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019: which model produced the numbers, and the threshold it was read with."""
    return hd.sr.AlgorithmIdentification(
        name=result.model_name,
        version=result.model_version,
        parameters=[f"threshold={result.threshold:g}"],
    )


def _tracking_uid(*parts: str) -> str:
    """Deterministic tracking UID, so a later result version tracks the same finding."""
    return str(generate_uid(entropy_srcs=["medbatch", *parts]))


def _library_ready(ds: pydicom.Dataset) -> bool:
    """Whether highdicom can describe `ds` in the TID 1600 Image Library (cross-sectional)."""
    needed = (
        "Rows",
        "Columns",
        "PixelSpacing",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "SliceThickness",
    )
    return all(ds.get(k) not in (None, "") for k in needed)


def build_structured_report(
    slices: Sequence[pydicom.Dataset],
    result: LungCtResult,
    *,
    series_number: int,
    instance_number: int = 1,
    manufacturer: str = "medbatch",
    institution: str | None = None,
) -> pydicom.Dataset:
    """The result as a TID 1500 Measurement Report (Comprehensive 3D SR) in the source study.

    Study-level group: lesion probability, "nodule-like lesion" present/absent by threshold,
    all slices as source images. Then one group per top-:data:`TOP_SLICES` slice, best first,
    with that slice's score and a reference to it. The result version and the disclaimer sit in
    the report-level Qualitative Evaluations container (TEXT items).
    """
    _check(slices, result)
    headers = [_header(ds) for ds in slices]
    study_uid = str(headers[0].StudyInstanceUID)
    series_uid = str(headers[0].get("SeriesInstanceUID", ""))
    algorithm = _algorithm(result)
    lung = [hd.sr.FindingSite(codes.SCT.Lung)]
    present = codes.SCT.Present if result.finding_present else codes.SCT.Absent

    def group(
        tracking_uid: str,
        identifier: str,
        concept: hd.sr.CodedConcept,
        value: float,
        sources: list[pydicom.Dataset],
        evaluations: list[hd.sr.QualitativeEvaluation] | None = None,
    ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        """One TID 1501 group: a probability-valued measurement over ``sources``."""
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
            finding_type=NODULE_LIKE_LESION,
            finding_sites=lung,
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=concept, value=value, unit=PROBABILITY_UNIT)],
            qualitative_evaluations=evaluations,
            source_images=[
                hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in sources
            ],
        )

    study_group = group(
        _tracking_uid(study_uid, series_uid, result.model_name, "study"),
        f"{result.model_name} study result v{result.result_version}",
        LESION_PROBABILITY,
        float(result.study_probability),
        headers,
        [hd.sr.QualitativeEvaluation(NODULE_LIKE_LESION, present)],
    )
    top = _ranked_indices(result)[:TOP_SLICES]
    slice_groups = [
        group(
            _tracking_uid(study_uid, result.model_name, str(headers[idx].SOPInstanceUID)),
            f"slice rank {rank} (instance {headers[idx].get('InstanceNumber', idx + 1)})",
            SLICE_SCORE,
            float(result.slice_scores[idx]),
            [headers[idx]],
        )
        for rank, idx in enumerate(top, start=1)
    ]

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # One device UID per model version: the "device" is the model, not the host.
            uid=_tracking_uid("device", result.model_name, result.model_version),
            name=result.model_name,
            manufacturer_name=manufacturer,
            model_name=f"{result.model_name} {result.model_version}",
        ),
    )
    library = [headers[i] for i in top]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[study_group, *slice_groups],
        referenced_images=library if all(_library_ready(h) for h in library) else None,
    )
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=RESULT_VERSION,
                value=str(result.result_version),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=DISCLAIMER,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    report[0].ContentSequence.append(evaluations)

    sr = hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        institution_name=institution,
        is_complete=True,
        is_final=False,  # unverified output of a reference model: never a final report
        series_description=_clip_lo(
            f"{result.model_name} v{result.model_version} r{result.result_version} "
            "reference model, not for clinical use"
        ),
        manufacturer_model_name=result.model_name,
        software_versions=result.model_version,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name="medbatch local codes",
                responsible_organization=manufacturer,
            )
        ],
    )
    return sr


def _patient_orientation(ds: pydicom.Dataset) -> tuple[str, str]:
    """Row and column directions of the slice (e.g. ``("L", "P")`` for an axial CT)."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        po = ds.get("PatientOrientation")
        if po is not None and len(po) == 2:
            return str(po[0]), str(po[1])
        raise ValueError("source slice has neither ImageOrientationPatient nor PatientOrientation")
    row = np.asarray(iop[:3], dtype=np.float64)
    col = np.asarray(iop[3:], dtype=np.float64)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    direction = np.column_stack([row, col, np.cross(row, col)])
    first, second, _ = get_closest_patient_orientation(direction)
    return first.value, second.value


def _render(hu_slice: npt.NDArray[np.floating], score: float, threshold: float) -> np.ndarray:
    """Lung-windowed RGB image with a red/amber frame and a score bar on the right edge.

    The bar fills from the bottom in proportion to the slice score; a cyan tick marks the
    threshold. No text, so nothing identifying can end up in the pixels.
    """
    hu = np.nan_to_num(np.asarray(hu_slice, dtype=np.float32), nan=-1024.0)
    grey = np.rint(lung_window(hu) * 255.0).astype(np.uint8)
    rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    rows, cols = grey.shape
    colour = COLOUR_ABOVE if score > threshold else COLOUR_BELOW

    t = max(1, min(rows, cols) // 128)  # frame thickness
    rgb[:t, :] = colour
    rgb[-t:, :] = colour
    rgb[:, :t] = colour
    rgb[:, -t:] = colour

    width = max(3, cols // 40)
    x0, x1 = cols - t - width, cols - t
    y0, y1 = t, rows - t  # bar spans the inside of the frame
    height = y1 - y0
    filled = round(min(max(score, 0.0), 1.0) * height)
    rgb[y0:y1, x0:x1] = COLOUR_TRACK
    if filled:
        rgb[y1 - filled : y1, x0:x1] = colour
    tick = y1 - round(threshold * height)
    tick = min(max(tick, y0), y1 - 1)
    rgb[tick, x0 - min(width // 2, x0) : x1] = COLOUR_THRESHOLD
    return rgb


def build_key_slice_image(
    slices: Sequence[pydicom.Dataset],
    hu_slice: np.ndarray,
    result: LungCtResult,
    *,
    series_number: int,
    instance_number: int = 1,
    manufacturer: str = "medbatch",
) -> pydicom.Dataset:
    """Secondary Capture of the most suspicious slice, score overlay burnt in, same study."""
    _check(slices, result)
    hu = np.asarray(hu_slice)
    if hu.ndim != 2:
        raise ValueError(f"hu_slice must be 2-D, got shape {hu.shape}")
    idx = most_suspicious_index(result)
    source = _header(slices[idx])
    score = float(result.slice_scores[idx])
    pixels = _render(hu, score, result.threshold)

    spacing = source.get("PixelSpacing")
    same_grid = spacing is not None and hu.shape == (source.get("Rows"), source.get("Columns"))
    # Typed Any: from_ref_dataset annotates pixel_spacing as tuple[int, int] (SCImage itself says
    # float); the spacing is in millimetres, float is right.
    pixel_spacing: Any = (float(spacing[0]), float(spacing[1])) if same_grid else None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        pixel_spacing=pixel_spacing,
        patient_orientation=_patient_orientation(source),
        # from_ref_dataset defaults to implicit VR little endian; the outputs are explicit.
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=_clip_lo(
            f"{result.model_name} key slice, reference model, not for clinical use"
        ),
        manufacturer_model_name=result.model_name,
        software_versions=result.model_version,
    )
    # Burned In Annotation means "enough burnt-in text to identify the patient": the overlay is
    # a frame and a bar, no text, so the honest value is NO.
    sc.BurnedInAnnotation = "NO"
    sc.ConversionType = "WSD"  # made by software from a DICOM image, not a digitized film
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"  # a lossy ancestor stays lossy
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [item]
    sc.DerivationDescription = (
        f"Lung window (centre {WINDOW_CENTER_HU:g} HU, width {WINDOW_WIDTH_HU:g} HU) of the "
        "source slice with the model's slice score burnt in as a coloured bar and frame."
    )
    sc.ImageComments = (
        f"{result.model_name} {result.model_version}, result {result.result_version}: "
        f"slice score {score:.3f}, study probability {result.study_probability:.3f} "
        f"(threshold {result.threshold:g}). {DISCLAIMER}"
    )
    return sc
