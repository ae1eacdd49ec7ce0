"""A long-format EHR extract as a hospital warehouse writes one, independent of medbatch's own
generator (:mod:`medbatch.synth.ehr`), for the benchmark: ``patient_id,timestamp,variable,value,
unit`` with

* a chosen density (rows per patient; ~90 is a realistic nightly extract of a diabetes clinic);
* visits of vitals (one timestamp) and a lab panel drawn minutes later (another timestamp), so a
  visit has two distinct stamps as real extracts do;
* timestamps in the mixed ISO 8601 forms exports write: a UTC offset (``+01:00``, ``-0500``),
  ``Z``, milliseconds, a blank instead of ``T``, no seconds, now and then none at all (local);
* some values in other units (glucose and cholesterol in mg/dL, HbA1c in mmol/mol);
* patients in no particular order (the query's), each one's rows together.

Deterministic for a seed; written with numpy string operations (a million rows in seconds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

#: (variable, unit, mean, sd, low, high, decimals) in the unit written.
_VITALS = (
    ("sbp", "mmHg", 135.0, 18.0, 80.0, 220.0, 0),
    ("dbp", "mmHg", 82.0, 11.0, 45.0, 130.0, 0),
    ("bmi", "kg/m2", 29.0, 5.0, 16.0, 60.0, 1),
)
_LABS = (
    ("hba1c", "%", 7.1, 1.3, 4.5, 14.0, 1),
    ("glucose", "mmol/L", 8.0, 2.5, 3.0, 25.0, 1),
    ("total_cholesterol", "mmol/L", 5.0, 1.0, 2.5, 9.0, 2),
    ("ldl", "mmol/L", 3.0, 0.9, 0.8, 6.5, 2),
    ("hdl", "mmol/L", 1.3, 0.35, 0.5, 3.0, 2),
    ("triglycerides", "mmol/L", 1.8, 0.8, 0.4, 6.0, 2),
    ("egfr", "mL/min/1.73m2", 78.0, 20.0, 15.0, 130.0, 0),
)
#: The same lab in another unit some sites use: (variable, unit, factor from the canonical).
_OTHER_UNITS = {
    "glucose": ("mg/dL", 18.016),
    "total_cholesterol": ("mg/dL", 38.67),
    "hba1c": ("mmol/mol", None),  # IFCC: 10.929 × (% − 2.15)
}
#: Timestamp forms (strftime-like templates filled below) and how often sites write each.
_FORMS = (
    ("{d}T{hms}+01:00", 0.25),
    ("{d}T{hms}Z", 0.2),
    ("{d}T{hms}.{ms}+02:00", 0.1),
    ("{d} {hms}-05:00", 0.1),
    ("{d}T{hm}-0500", 0.05),
    ("{d}T{hms}", 0.2),
    ("{d} {hm}", 0.1),
)


def _fmt(values: npt.NDArray[np.float64], decimals: int) -> npt.NDArray[np.str_]:
    return np.char.mod(f"%.{decimals}f", values)


def write_extract(path: Path, rows: int, rows_per_patient: float, seed: int = 18) -> int:
    """Write about ``rows`` rows at ``rows_per_patient`` on average; returns the patients."""
    rng = np.random.default_rng(seed)
    per_visit = 1 + len(_VITALS) + len(_LABS) * 0.85  # age, vitals; labs are sometimes missing
    n_patients = max(1, round(rows / rows_per_patient))
    visits = np.maximum(1, rng.poisson(max(rows_per_patient - 2, 1) / per_visit, n_patients))
    order = rng.permutation(n_patients)  # the query's order, not the identifiers'
    ids = np.char.add("MRN", np.char.zfill((10_000_000 + order * 7919 % 9_000_000).astype(str), 8))
    patient_of_visit = np.repeat(np.arange(n_patients), visits)
    n_visits = len(patient_of_visit)
    # visit times: each patient's first visit in 2015–2023, then every 1–9 months
    start = rng.integers(0, 9 * 365, n_patients)[patient_of_visit]
    first = np.r_[0, np.cumsum(visits)[:-1]]
    k = np.arange(n_visits) - np.repeat(first, visits)
    gaps = rng.integers(30, 270, n_visits)
    days = start + np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first], visits)
    minutes = rng.integers(7 * 60, 18 * 60, n_visits)
    base = np.datetime64("2015-01-01T00:00") + days.astype("timedelta64[D]")
    vit_time = base + minutes.astype("timedelta64[m]")
    lab_time = vit_time + rng.integers(5, 90, n_visits).astype("timedelta64[m]")
    site_form = rng.choice(len(_FORMS), n_patients, p=[p for _, p in _FORMS])[patient_of_visit]
    sd = rng.normal(0.0, 1.0, n_patients)[patient_of_visit]  # each patient's own level
    age = (rng.integers(25, 85, n_patients)[patient_of_visit] + k // 3).astype(float)

    pid_cols: list[npt.NDArray[np.object_]] = []
    time_cols: list[npt.NDArray[np.object_]] = []
    var_cols: list[npt.NDArray[np.object_]] = []
    val_cols: list[npt.NDArray[np.object_]] = []
    unit_cols: list[npt.NDArray[np.object_]] = []
    visit_cols: list[npt.NDArray[np.int64]] = []

    def stamps(times: npt.NDArray[np.datetime64], which: npt.NDArray[np.bool_]) -> None:
        t = times[which]
        text = t.astype("datetime64[s]").astype(str)  # 2019-03-04T08:15:00
        d, hms = np.char.partition(text, "T")[:, 0], np.char.partition(text, "T")[:, 2]
        hm = np.char.rpartition(hms, ":")[:, 0]
        ms = np.char.zfill(rng.integers(0, 1000, len(t)).astype(str), 3)
        out = np.empty(len(t), dtype=object)
        forms = site_form[which]
        for f, (template, _) in enumerate(_FORMS):
            sel = forms == f
            parts = template.replace("{", "|{").replace("}", "}|").split("|")
            pieces = {"{d}": d[sel], "{hms}": hms[sel], "{hm}": hm[sel], "{ms}": ms[sel]}
            acc = np.full(int(sel.sum()), "", dtype=object)
            for part in parts:
                acc = acc + (pieces[part].astype(object) if part in pieces else part)
            out[sel] = acc
        time_cols.append(out)

    def add(
        name: str,
        unit: str,
        value: npt.NDArray[np.float64],
        decimals: int,
        times: npt.NDArray[np.datetime64],
        which: npt.NDArray[np.bool_],
    ) -> None:
        units = np.full(int(which.sum()), unit, dtype=object)
        text = _fmt(value[which], decimals).astype(object)
        if name in _OTHER_UNITS:  # a quarter of the sites report it in the other unit
            other = (site_form[which] % 4) == 0
            other_unit, factor = _OTHER_UNITS[name]
            v = value[which][other]
            converted = 10.929 * (v - 2.15) if factor is None else v * factor
            text[other] = _fmt(converted, 0 if factor is None else 1).astype(object)
            units[other] = other_unit
        pid_cols.append(ids[patient_of_visit[which]].astype(object))
        visit_cols.append(np.flatnonzero(which))
        stamps(times, which)
        var_cols.append(np.full(int(which.sum()), name, dtype=object))
        val_cols.append(text)
        unit_cols.append(units)

    everyone = np.ones(n_visits, dtype=bool)
    add("age", "years", age, 0, vit_time, everyone)
    for name, unit, mean, spread, low, high, dec in _VITALS:
        value = np.clip(mean + spread * (0.7 * sd + 0.7 * rng.normal(size=n_visits)), low, high)
        add(name, unit, value, dec, vit_time, everyone)
    for name, unit, mean, spread, low, high, dec in _LABS:
        value = np.clip(mean + spread * (0.6 * sd + 0.8 * rng.normal(size=n_visits)), low, high)
        add(name, unit, value, dec, lab_time, rng.random(n_visits) < 0.85)
    first_visit = k == 0
    add("sex", "", rng.integers(0, 2, n_visits).astype(float), 0, vit_time, first_visit)
    add("smoker", "", (rng.random(n_visits) < 0.2).astype(float), 0, vit_time, first_visit)

    # Rows of a visit together, visits of a patient together (in time), patients in the order
    # of the query, which is not the identifiers' (they were drawn in permuted order).
    row_order = np.argsort(np.concatenate(visit_cols), kind="stable")
    columns = [
        np.concatenate(c)[row_order] for c in (pid_cols, time_cols, var_cols, val_cols, unit_cols)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        fh.write("patient_id,timestamp,variable,value,unit\n")
        for at in range(0, len(columns[0]), 200_000):
            chunk = [col[at : at + 200_000] for col in columns]
            fh.writelines(f"{a},{b},{c},{d},{e}\n" for a, b, c, d, e in zip(*chunk, strict=True))
    return n_patients
