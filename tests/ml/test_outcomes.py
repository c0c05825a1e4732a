"""Clinician outcomes (``monitoring.outcomes``): validated, appended owner-only, never overwritten; conflicts
kept, flagged and left out of the labels until a superseding record resolves them."""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pandas as pd
import pytest
from outcome_helpers import log_cases

from melanoma_ml.monitoring import outcomes as oc
from melanoma_ml.monitoring.outcomes import (
    CONFLICT,
    CONSISTENT,
    OutcomeError,
    case_status,
    labelled_cases,
    outcomes_file,
    parse_outcome,
    read_outcomes,
    record_outcome,
)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("melanoma", "melanoma"),
        (" Melanoma ", "melanoma"),
        ("MEL", "melanoma"),
        ("1", "melanoma"),
        ("benign", "benign"),
        ("Not  melanoma", "benign"),
        ("non-melanoma", "benign"),
        ("0", "benign"),
    ],
)
def test_accepted_outcome_spellings(text, expected) -> None:
    assert parse_outcome(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("malignant", "does not say whether it is a melanoma"),
        ("", "outcome is empty"),
        (None, "outcome is empty"),
        ("yes", "is not one of melanoma/benign"),
        ("2", "is not one of melanoma/benign"),
        ("x" * 5000, "..."),
    ],
)
def test_bad_outcomes_are_refused_with_the_accepted_values(text, message) -> None:
    with pytest.raises(OutcomeError, match="melanoma") as err:
        parse_outcome(text)
    assert message in str(err.value)
    assert len(str(err.value)) < 400


def test_an_outcome_is_appended_owner_only_and_read_back(root: Path) -> None:
    (case,) = log_cases(root, 1)
    result = record_outcome(root, case, "melanoma", source="app", reported_by="Dr A", note="Breslow 0.4 mm")
    assert result.written and result.state == CONSISTENT
    assert f"recorded melanoma for case {case}" in result.message
    path = outcomes_file(root)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    (line,) = path.read_text().splitlines()
    record = json.loads(line)
    assert record["case_id"] == case and record["outcome"] == "melanoma" and record["source"] == "app"
    assert record["recorded_at"].endswith("Z") and record["supersedes"] is False
    frame = read_outcomes(root)
    assert list(frame.columns) == [*oc.RECORD_KEYS, "import_file", "row", "line"]
    assert frame.loc[0, "note"] == "Breslow 0.4 mm"


def test_a_case_id_is_read_whatever_its_letter_case(root: Path) -> None:
    (case,) = log_cases(root, 1)
    for typed in (f" {case.upper()} ", case.lower()):
        result = record_outcome(root, typed, "benign", source="app")
        assert result.record.case_id == case


@pytest.mark.parametrize(
    ("case_id", "message"),
    [
        ("", "case id is empty"),
        ("patient 12", "is not a case id: case ids look like C-"),
        ("C-20261207-000000000000", "unknown case id 'C-20261207-000000000000': no scored image has it"),
        ("C-20261399-000000000000", "unknown case id"),
    ],
)
def test_unknown_or_malformed_case_ids_are_refused_and_nothing_is_written(root, case_id, message) -> None:
    log_cases(root, 2)
    with pytest.raises(OutcomeError) as err:
        record_outcome(root, case_id, "melanoma", source="app")
    assert message in str(err.value)
    assert not outcomes_file(root).exists()


def test_with_an_empty_prediction_log_the_refusal_says_the_log_must_be_on(root: Path) -> None:
    with pytest.raises(OutcomeError, match="prediction log is empty.*serving.prediction_log"):
        record_outcome(root, "C-20261207-3f9a1c2b0d4e", "melanoma", source="app")


@pytest.mark.parametrize(("field", "limit"), [("note", 2000), ("reported_by", 200), ("patient_id", 100)])
def test_texts_longer_than_the_limit_are_refused(root, field, limit) -> None:
    (case,) = log_cases(root, 1)
    with pytest.raises(OutcomeError, match=f"{field} has {limit + 1:,} characters"):
        record_outcome(root, case, "benign", source="app", **{field: "x" * (limit + 1)})
    record_outcome(root, case, "benign", source="app", **{field: "x" * limit})


def test_the_same_outcome_twice_adds_nothing(root: Path) -> None:
    (case,) = log_cases(root, 1)
    record_outcome(root, case, "benign", source="app")
    again = record_outcome(root, case, "0", source="import")
    assert not again.written and "already recorded" in again.message
    assert len(read_outcomes(root)) == 1


def test_conflicting_outcomes_are_kept_flagged_and_left_out_until_resolved(root: Path) -> None:
    a, b = log_cases(root, 2)
    record_outcome(root, a, "benign", source="app", reported_by="Dr A")
    record_outcome(root, b, "benign", source="app")
    second = record_outcome(root, a, "melanoma", source="import", reported_by="Lab B")
    assert second.written and second.state == CONFLICT
    assert "conflicting outcomes" in second.message and "--supersedes" in second.message
    assert "benign on" in second.message and "by Dr A" in second.message
    history = read_outcomes(root)
    assert list(history["outcome"]) == ["benign", "benign", "melanoma"]  # nothing overwritten
    status = case_status(history).set_index("case_id")
    assert status.loc[a, "state"] == CONFLICT and pd.isna(status.loc[a, "outcome"])
    assert list(labelled_cases(root)["case_id"]) == [b]

    resolved = record_outcome(root, a, "melanoma", source="cli", supersedes=True, note="slides re-read")
    assert resolved.state == CONSISTENT
    labels = labelled_cases(root).set_index("case_id")
    assert labels.loc[a, "outcome"] == "melanoma" and labels.loc[a, "target"] == 1
    assert labels.loc[b, "target"] == 0
    assert len(read_outcomes(root)) == 4

    reopened = record_outcome(root, a, "benign", source="import", reported_by="Lab C")
    # "benign" for this case is already in its history (the superseded report): nothing added
    assert not reopened.written and reopened.state == CONSISTENT
    new_claim = record_outcome(root, b, "melanoma", source="import")
    assert new_claim.state == CONFLICT


def test_a_report_after_a_resolution_that_disagrees_opens_the_conflict_again(root: Path) -> None:
    (case,) = log_cases(root, 1)
    record_outcome(root, case, "melanoma", source="app", supersedes=True)
    record_outcome(root, case, "benign", source="app")
    assert case_status(read_outcomes(root)).loc[0, "state"] == CONFLICT


def test_labelled_cases_joins_each_scored_record_to_its_outcome(root: Path) -> None:
    cases = log_cases(root, 4)
    record_outcome(root, cases[0], "melanoma", source="app", patient_id="P-7")
    record_outcome(root, cases[2], "benign", source="app")
    labels = labelled_cases(root)
    assert sorted(labels["case_id"]) == sorted([cases[0], cases[2]])
    row = labels.set_index("case_id").loc[cases[0]]
    assert row["patient_id"] == "P-7" and row["model_version"] == "v0001" and row["image_path"]
    assert labels["target"].dtype == "int64"


def test_a_torn_last_line_is_skipped_and_the_next_record_is_whole(root: Path, caplog) -> None:
    a, b = log_cases(root, 2)
    record_outcome(root, a, "benign", source="app")
    with open(outcomes_file(root), "ab") as fh:
        fh.write(b'{"case_id": "' + b.encode() + b'", "outc')  # a writer killed mid-record
    record_outcome(root, b, "melanoma", source="app")
    lines = outcomes_file(root).read_bytes().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["case_id"] == b
    with caplog.at_level("WARNING"):
        frame = read_outcomes(root)
    assert list(frame["case_id"]) == [a, b] and list(frame["line"]) == [1, 3]
    assert "line 2 is not a valid outcome record" in caplog.text


def test_concurrent_writers_never_interleave_a_record(root: Path) -> None:
    cases = log_cases(root, 8)
    errors: list[BaseException] = []

    def write(case: str) -> None:
        try:
            for outcome in ("benign", "melanoma") * 5:
                oc.append_records(root, [oc.new_record(case, outcome, source="app", known={case}, root=root)])
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lines = outcomes_file(root).read_text().splitlines()
    assert len(lines) == 8 * 10 and all(json.loads(line)["case_id"] in cases for line in lines)
    assert len(read_outcomes(root)) == 80


def test_status_text_counts_and_lists_conflicts(root: Path) -> None:
    a, b, c = log_cases(root, 3)
    record_outcome(root, a, "melanoma", source="app")
    record_outcome(root, b, "benign", source="app")
    record_outcome(root, b, "melanoma", source="app")
    text = oc.status_text(root)
    assert "3 records for 2 cases: 1 labelled (1 melanoma, 0 benign), 1 in conflict" in text
    assert f"conflict: {b}: benign, melanoma (2 records)" in text
    assert c not in text


def test_no_outcomes_gives_empty_tables_with_the_columns(root: Path) -> None:
    log_cases(root, 1)
    assert read_outcomes(root).empty
    labels = labelled_cases(root)
    assert labels.empty and {"case_id", "outcome", "target", "probability"} <= set(labels.columns)
    assert isinstance(case_status(read_outcomes(root)), pd.DataFrame)


def test_cli_record_resolves_a_conflict_and_refuses_an_unknown_case(root: Path, capsys) -> None:
    from melanoma_ml.cli import main

    (case,) = log_cases(root, 1)
    settings = ["--artifact-root", str(root), "--profile", "tiny"]
    assert main(["outcomes", "record", case, "benign", *settings]) == 0
    assert main(["outcomes", "record", case, "melanoma", "--reported-by", "Lab", *settings]) == 0
    assert "conflicting outcomes" in capsys.readouterr().out
    code = main(["outcomes", "record", case, "melanoma", "--supersedes", "--note", "re-read", *settings])
    assert code == 0 and f"case {case} is labelled melanoma" in capsys.readouterr().out
    assert main(["outcomes", "record", "C-20261207-000000000000", "benign", *settings]) == 2
    assert "error: unknown case id 'C-20261207-000000000000'" in capsys.readouterr().err
    assert list(read_outcomes(root)["source"]) == ["cli"] * 3


@pytest.mark.parametrize("seed", range(5))
def test_case_status_follows_the_rule_on_random_histories(seed: int) -> None:
    """The vectorized status equals the rule read literally: from the last supersedes record on, one
    outcome = consistent; any other mix = conflict."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = 300
    history = pd.DataFrame(
        {
            "case_id": [f"c{i}" for i in rng.integers(0, 40, n)],
            "outcome": rng.choice(["melanoma", "benign"], n),
            "supersedes": rng.random(n) < 0.15,
            "recorded_at": [f"t{i:04d}" for i in range(n)],
            "reported_by": None,
            "patient_id": rng.choice([None, "P1", "P2"], n),
        }
    )
    status = case_status(history).set_index("case_id")
    assert list(status.index) == list(dict.fromkeys(history["case_id"]))
    for case, records in history.groupby("case_id"):
        marks = np.flatnonzero(records["supersedes"].to_numpy())
        effective = records.iloc[marks[-1] :] if len(marks) else records
        outcomes = set(effective["outcome"])
        row = status.loc[case]
        assert row["records"] == len(records)
        assert row["state"] == (CONSISTENT if len(outcomes) == 1 else CONFLICT)
        assert row["outcomes"] == ", ".join(sorted(outcomes))
        assert row["recorded_at"] == effective["recorded_at"].iloc[-1]
        if len(outcomes) == 1:
            assert row["outcome"] == outcomes.pop() and row["target"] == oc.TARGETS[row["outcome"]]
        given = records["patient_id"].dropna()
        assert row["patient_id"] == (given.iloc[-1] if len(given) else None)
