"""What the listener accepts: complete images with their UIDs; everything else with a reason."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from core.errors import ConfigurationError, InstanceRefusedError
from ingest.dicom.access import AccessPolicy, parse_allow_list
from ingest.dicom.validate import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DOES_NOT_MATCH,
    inspect_instance,
)
from tests.dicom_data import CT_SMALL

CT = "1.2.840.10008.5.1.4.1.1.2"


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_complete_ct_slice_is_accepted_without_patient_data() -> None:
    inst = inspect_instance(CT_SMALL.read_bytes(), context_sop_class=CT)
    ds = pydicom.dcmread(CT_SMALL)
    assert inst.sop_instance_uid == ds.SOPInstanceUID
    assert inst.modality == "CT"
    assert inst.patient_digest.startswith("sha256:")
    assert str(ds.PatientID) not in repr(inst)


@pytest.mark.parametrize("keep", [0.95, 0.6, 0.2])
def test_a_truncated_slice_is_refused_as_truncated(keep: float) -> None:
    data = CT_SMALL.read_bytes()
    with pytest.raises(InstanceRefusedError) as err:
        inspect_instance(data[: int(len(data) * keep)], context_sop_class=CT)
    assert err.value.status == STATUS_CANNOT_UNDERSTAND
    assert "truncated" in err.value.reason


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "JPEG2000.dcm"])
def test_truncated_compressed_pixel_data_is_refused(name: str) -> None:
    path = Path(str(get_testdata_file(name)))
    ds = pydicom.dcmread(path)
    data = path.read_bytes()
    cut = data[: len(data) - 200]
    with pytest.raises(InstanceRefusedError) as err:
        inspect_instance(cut, context_sop_class=str(ds.SOPClassUID))
    assert "truncated" in err.value.reason
    # and the complete file passes
    assert inspect_instance(data, context_sop_class=str(ds.SOPClassUID)).sop_instance_uid


def test_missing_uids_are_named() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    del ds.StudyInstanceUID
    with pytest.raises(InstanceRefusedError) as err:
        inspect_instance(_bytes(ds), context_sop_class=CT)
    assert err.value.status == STATUS_DOES_NOT_MATCH
    assert "StudyInstanceUID" in err.value.reason


def test_garbage_is_refused() -> None:
    with pytest.raises(InstanceRefusedError) as err:
        inspect_instance(b"\x00" * 128 + b"DICM" + b"\xff" * 50, context_sop_class=CT)
    assert err.value.status == STATUS_CANNOT_UNDERSTAND


def test_a_non_image_object_is_refused_with_its_class() -> None:
    path = Path(str(get_testdata_file("test-SR.dcm")))
    ds = pydicom.dcmread(path)
    with pytest.raises(InstanceRefusedError) as err:
        inspect_instance(path.read_bytes(), context_sop_class=str(ds.SOPClassUID))
    assert err.value.status == STATUS_DOES_NOT_MATCH
    assert "not an image" in err.value.reason


def test_sop_class_must_match_the_negotiated_context() -> None:
    with pytest.raises(InstanceRefusedError, match="differs from the negotiated"):
        inspect_instance(CT_SMALL.read_bytes(), context_sop_class="1.2.840.10008.5.1.4.1.1.4")


def test_allow_list_by_ae_and_network() -> None:
    policy = AccessPolicy(parse_allow_list("CT1, PACS@10.0.0.5, MOD@10.1.0.0/16"))
    assert policy.allows("CT1", "192.168.1.1")
    assert policy.allows("PACS", "10.0.0.5")
    assert not policy.allows("PACS", "10.0.0.6")
    assert policy.allows("MOD", "10.1.200.3")
    assert not policy.allows("MOD", "10.2.0.1")
    assert not policy.allows("INTRUDER", "10.0.0.5")


def test_an_empty_allow_list_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="MEDBATCH_DICOM_ALLOWED_AES"):
        AccessPolicy.from_settings("", allow_any=False)
    assert AccessPolicy.from_settings("", allow_any=True).allows("ANY", "1.2.3.4")
    with pytest.raises(ConfigurationError):
        parse_allow_list("PACS@not-an-address")
