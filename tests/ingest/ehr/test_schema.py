"""The EHR variable schema: unit conversions, hard ranges, the rejection reasons an operator
reads, wide-header parsing and the per-model input lists."""

from __future__ import annotations

import pytest

from core.model_registry import ehr_models
from ingest.ehr.schema import (
    VARIABLES,
    BlankRow,
    ImpossibleValue,
    MissingId,
    ModelSchema,
    RowRejected,
    UnknownUnit,
    UnknownVariable,
    UnparseableTime,
    UnparseableValue,
    WrongFieldCount,
    check_long_row,
    check_wide_row,
    convert,
    model_schema,
    normalise_unit,
    parse_timestamp,
    parse_value,
    parse_wide_header,
    variable,
    wide_header,
)


def test_hba1c_ifcc_master_equation() -> None:
    assert convert("hba1c", 53, "mmol/mol") == pytest.approx(7.0, abs=0.05)
    assert VARIABLES["hba1c"].conversion("mmol/mol").from_canonical(7.0) == pytest.approx(
        53, abs=0.5
    )
    assert convert("hba1c", 48, "mmol/mol") == pytest.approx(6.5, abs=0.05)
    assert convert("hba1c", 7.0, "%") == 7.0


@pytest.mark.parametrize(
    ("var", "value", "unit", "expected", "tol"),
    [
        ("glucose", 180, "mg/dL", 9.99, 0.01),
        ("glucose", 90, "MG/DL", 5.0, 0.01),
        ("total_cholesterol", 200, "mg/dl", 5.17, 0.01),
        ("ldl", 100, "mg/dL", 2.59, 0.01),
        ("hdl", 40, "mg/dL", 1.03, 0.01),
        ("triglycerides", 150, "mg/dL", 1.69, 0.01),
        ("sbp", 120, "mm Hg", 120, 0),
        ("bmi", 27.5, "kg/m²", 27.5, 0),
        ("bmi", 27.5, "kg/m^2", 27.5, 0),
        ("egfr", 75, "mL/min/1.73 m²", 75, 0),
        ("age", 64, "yrs", 64, 0),
        ("smoker", 1, "", 1, 0),
        ("sex", 0, "flag", 0, 0),
    ],
)
def test_conversions(var: str, value: float, unit: str, expected: float, tol: float) -> None:
    assert convert(var, value, unit) == pytest.approx(expected, abs=tol)


def test_conversion_round_trip() -> None:
    for v in VARIABLES.values():
        for unit, conv in v.units.items():
            mid = (v.low + v.high) / 2
            assert conv.to_canonical(conv.from_canonical(mid)) == pytest.approx(mid), (v, unit)


def test_normalise_unit() -> None:
    assert normalise_unit(" MG / DL ") == "mg/dl"
    assert normalise_unit("kg/m²") == normalise_unit("kg/m^2") == "kg/m2"
    assert normalise_unit("µmol/L") == "umol/l"


def test_unknown_unit_reason() -> None:
    with pytest.raises(UnknownUnit) as exc:
        convert("glucose", 5, "mg")
    assert exc.value.reason == "unknown unit 'mg' for glucose; accepted: mg/dL, mmol/L"
    assert exc.value.kind == "unknown_unit"
    assert isinstance(exc.value, ValueError)
    with pytest.raises(UnknownUnit, match="for hba1c; accepted: %, mmol/mol"):
        convert("hba1c", 7, "mmol")


def test_impossible_value_reason() -> None:
    with pytest.raises(ImpossibleValue) as exc:
        convert("hba1c", 45.0, "%")
    assert exc.value.reason == ("impossible value 45.0 % for hba1c (physiological range 3–20 %)")
    with pytest.raises(ImpossibleValue, match=r"700.0 mmol/mol \(= 66.2 %\) for hba1c"):
        convert("hba1c", 700, "mmol/mol")
    with pytest.raises(ImpossibleValue, match="sbp"):
        convert("sbp", 20, "mmHg")
    with pytest.raises(ImpossibleValue, match="bmi"):
        convert("bmi", 250, "kg/m2")
    with pytest.raises(ImpossibleValue, match="flag: 0 or 1"):
        convert("smoker", 2, "")
    with pytest.raises(ImpossibleValue):
        convert("glucose", -5, "mmol/L")
    # the limits themselves are possible
    assert convert("hba1c", 20, "%") == 20


def test_nan_is_unparseable() -> None:
    with pytest.raises(UnparseableValue):
        convert("hba1c", float("nan"), "%")


def test_variable_lookup_and_aliases() -> None:
    assert variable("HbA1c").name == "hba1c"
    assert variable("A1C").name == "hba1c"
    assert variable("Systolic BP").name == "sbp"
    assert variable("TG").name == "triglycerides"
    with pytest.raises(UnknownVariable, match="unknown variable 'hba1cc'"):
        variable("hba1cc")


def test_declaration_is_consistent() -> None:
    for name, v in VARIABLES.items():
        assert v.name == name
        assert v.low < v.high
        assert v.conversion(v.canonical_unit).is_identity
        assert v.description


@pytest.mark.parametrize("text", ["7,2", "7..2", "abc", "", " ", "nan", "inf", "7.2.1", "1_000"])
def test_parse_value_rejects(text: str) -> None:
    with pytest.raises(UnparseableValue):
        parse_value(text)


def test_parse_value_accepts() -> None:
    assert parse_value(" 7.2 ") == 7.2
    assert parse_value("-1") == -1
    assert parse_value(".5") == 0.5
    assert parse_value("1e3") == 1000


@pytest.mark.parametrize(
    "text", ["2024-13-45", "2021-02-30", "31/01/2020", "20240101?", "", "N/A", "yesterday"]
)
def test_parse_timestamp_rejects(text: str) -> None:
    with pytest.raises(UnparseableTime):
        parse_timestamp(text)


def test_parse_timestamp_accepts_iso() -> None:
    assert parse_timestamp("2024-03-05").day == 5
    assert parse_timestamp("2024-03-05T08:42:00").hour == 8
    assert parse_timestamp("2024-03-05 08:42").minute == 42
    assert parse_timestamp("2024-03-05T08:42:00Z").utcoffset() is not None


def test_wide_header_parsing() -> None:
    assert parse_wide_header("glucose (mg/dL)") == ("glucose", "mg/dL")
    assert parse_wide_header(" HbA1c ( mmol/mol ) ") == ("hba1c", "mmol/mol")
    assert parse_wide_header("smoker") == ("smoker", "")
    assert parse_wide_header("bmi (kg/m²)") == ("bmi", "kg/m²")
    assert wide_header("hba1c", "%") == "hba1c (%)"
    assert wide_header("sex", "") == "sex"
    for v in VARIABLES.values():
        for unit in v.units:
            assert parse_wide_header(wide_header(v.name, unit)) == (v.name, unit)
    with pytest.raises(UnknownUnit, match="unknown unit 'mg' for glucose"):
        parse_wide_header("glucose (mg)")
    with pytest.raises(UnknownVariable):
        parse_wide_header("potassium (mmol/L)")
    with pytest.raises(UnknownVariable):
        parse_wide_header("glucose (mg/dL")


def test_check_long_row() -> None:
    m = check_long_row(["MRN00000001", "2024-03-05T08:42:00", "glucose", "180", "mg/dL"])
    assert (m.patient_id, m.variable) == ("MRN00000001", "glucose")
    assert m.value == pytest.approx(9.99, abs=0.01)
    cases: list[tuple[list[str], type[RowRejected]]] = [
        ([], BlankRow),
        (["", "", "", "", ""], BlankRow),
        (["MRN1", "2024-03-05", "glucose", "5"], WrongFieldCount),
        (["  ", "2024-03-05", "glucose", "5", "mmol/L"], MissingId),
        (["MRN1", "2024-13-45", "glucose", "5", "mmol/L"], UnparseableTime),
        (["MRN1", "2024-03-05", "glucoze", "5", "mmol/L"], UnknownVariable),
        (["MRN1", "2024-03-05", "glucose", "5,2", "mmol/L"], UnparseableValue),
        (["MRN1", "2024-03-05", "glucose", "5", "mg"], UnknownUnit),
        (["MRN1", "2024-03-05", "hba1c", "70", "%"], ImpossibleValue),
    ]
    for fields, kind in cases:
        with pytest.raises(kind):
            check_long_row(fields)


def test_check_wide_row() -> None:
    columns = [parse_wide_header(h) for h in ("hba1c (%)", "glucose (mg/dL)", "smoker")]
    got = check_wide_row(["MRN1", "2024-03-05", "7.1", "", "0"], columns)
    assert [(m.variable, m.value) for m in got] == [("hba1c", 7.1), ("smoker", 0)]
    with pytest.raises(ImpossibleValue):
        check_wide_row(["MRN1", "2024-03-05", "71", "", "0"], columns)
    with pytest.raises(WrongFieldCount):
        check_wide_row(["MRN1", "2024-03-05", "7.1"], columns)


def test_rejection_with_row_number() -> None:
    with pytest.raises(RowRejected) as exc:
        convert("hba1c", 45.0, "%")
    at = exc.value.at_row(17)
    assert isinstance(at, ImpossibleValue)
    assert at.row == 17
    assert str(at) == f"row 17: {exc.value.reason}"


def test_model_schemas() -> None:
    dm = model_schema("diabetes_lstm_attention")
    assert dm.sequence and dm.max_visits == 20
    assert {"hba1c", "glucose", "sbp", "egfr", "age"} <= set(dm.variables)
    cvd = model_schema("cvd_autoencoder")
    assert not cvd.sequence and cvd.max_visits is None
    assert {"age", "sex", "smoker", "total_cholesterol", "hdl", "sbp"} <= set(cvd.variables)
    for m in ehr_models():
        assert all(v in VARIABLES for v in model_schema(m.name).variables)
    with pytest.raises(ValueError, match="undeclared variable"):
        ModelSchema("x", ("potassium",), sequence=False, max_visits=None)
    with pytest.raises(KeyError):
        model_schema("nope")
