"""Hostile and unusual input bytes: each bad one is a violation naming file, line and rule, never a traceback;
each unusual but valid one (U+2028 inside a string, CRLF line endings) loads as written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, data_cfg
from data_contracts.contracts import validate_sources
from data_contracts.loaders import load_jsonl, load_markdown_docs

ROW = {"id": "qa-x", "module": "hr", "lang": "en", "instruction": "How do I book leave?", "response": "Open HR > Leave"}
BIG_INT = '{"id": ' + "1" * 5000 + "}"
DEEP_JSON = '{"id": ' + "[" * 200_000 + "]" * 200_000 + "}"
SURROGATE_ROW = json.dumps(ROW).replace('"Open', '"\\ud800Open')
CORRECTIONS = [{"trace_id": "tr-" + "a" * 32,
                "question": "How do I reverse a posted journal entry\u2028in a closed period?",
                "correction": "Open Finance > Journal > Reverse and pick a date in the open period.",
                "sources": ["finance_guide_en.md"]},
               {"trace_id": "tr-" + "b" * 32, "question": "Where do I set the default tax code for a vendor?",
                "correction": "Procurement > Vendors > edit the vendor, Tax tab, choose the code and save.",
                "sources": ["procurement_guide_en.md"]}]


def _doc(folder: Path, name: str, front: str, newline: str = "\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = f"---\n{front}\n---\n\n## Steps\n" + "Open the menu and save the form. " * 8 + "\n"
    (folder / name).write_bytes(text.replace("\n", newline).encode("utf-8"))
    return folder / name


def test_unreadable_json_lines_are_parse_violations(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([json.dumps(ROW), BIG_INT, DEEP_JSON, json.dumps(ROW)]) + "\n", encoding="utf-8")
    rows, violations = load_jsonl(path)
    assert [r.line for r in rows] == [1, 4]
    assert [(v.rule, v.line) for v in violations] == [("json.parse", 2), ("json.parse", 3)]
    assert "4300 digits" in violations[0].detail and "set_int_max_str_digits" not in violations[0].detail
    assert "nested too deeply" in violations[1].detail


def test_a_lone_surrogate_escape_is_an_encoding_violation_and_a_pair_is_a_character(tmp_path):
    path = tmp_path / "x.jsonl"
    emoji = json.dumps(dict(ROW, id="qa-y", response="Done \U0001F600"))  # ensure_ascii writes "\ud83d\ude00"
    nested = '{"id": "c", "messages": [{"role": "user", "content": "\\udfff"}]}'
    path.write_text("\n".join([SURROGATE_ROW, emoji, nested]) + "\n", encoding="utf-8")
    rows, violations = load_jsonl(path)
    assert [(r.line, r.data["response"]) for r in rows] == [(2, "Done \U0001F600")]
    assert [(v.rule, v.line) for v in violations] == [("encoding.utf8", 1), ("encoding.utf8", 3)]
    assert "field 'response'" in violations[0].detail and "field 'messages'" in violations[1].detail


def test_line_and_paragraph_separators_inside_strings_stay_in_their_row(tmp_path):
    path = tmp_path / "x.jsonl"
    texts = ["one\u2028two", "three\u2029four", "five\x85six"]
    rows = [dict(ROW, id=f"qa-{i}", response=t) for i, t in enumerate(texts)]
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode("utf-8"))
    loaded, violations = load_jsonl(path)
    assert violations == []
    assert [(r.line, r.data["response"]) for r in loaded] == [(1, texts[0]), (2, texts[1]), (3, texts[2])]


def test_markdown_with_crlf_line_endings_loads(tmp_path):
    _doc(tmp_path / "docs", "crlf.md", "title: Journal guide\nmodule: finance\nlang: en", newline="\r\n")
    rows, violations = load_markdown_docs(tmp_path / "docs")
    assert violations == []
    (row,) = rows
    assert (row.data["title"], row.data["module"], row.line) == ("Journal guide", "finance", 6)
    assert row.data["body"].startswith("## Steps\nOpen the menu") and "\r" not in row.data["body"]


def test_bad_front_matter_values_are_front_matter_or_encoding_violations(tmp_path):
    docs = tmp_path / "docs"
    _doc(docs, "deep.md", "title: " + "[" * 50_000 + "]" * 50_000 + "\nmodule: finance\nlang: en")
    _doc(docs, "date.md", "title: T\nmodule: finance\nlang: en\nupdated: 2024-13-01")
    _doc(docs, "surrogate.md", 'title: "Guide \\ud800"\nmodule: finance\nlang: en')
    _doc(docs, "cycle.md", "title: T\nmodule: finance\nlang: en\nx: &a [*a, \"\\U0000dc00\"]")
    rows, violations = load_markdown_docs(docs)
    assert rows == []
    got = {(Path(v.file).name, v.rule, v.line) for v in violations}
    assert got == {("cycle.md", "encoding.utf8", 1), ("date.md", "doc.front_matter", 1),
                   ("deep.md", "doc.front_matter", 1), ("surrogate.md", "encoding.utf8", 1)}
    assert {v.detail for v in violations if v.file.endswith("deep.md")} == {"front matter is nested too deeply"}


def test_validation_reports_a_surrogate_where_pandas_would_have_failed(corpus):
    with open(corpus / "qa_pairs.jsonl", "a", encoding="utf-8") as f:
        f.write(SURROGATE_ROW + "\n")
    _doc(corpus / "erp_docs", "zz_surrogate.md", 'title: "Guide \\ud800"\nmodule: finance\nlang: en')
    report, corpus_rows = validate_sources(data_cfg(corpus))
    assert {(Path(v.file).name, v.rule, v.line) for v in report.errors} == {
        ("qa_pairs.jsonl", "encoding.utf8", 41), ("zz_surrogate.md", "encoding.utf8", 1)}
    assert len(corpus_rows.qa_pairs) == 40 and len(corpus_rows.docs) == 8


def test_validate_cli_names_every_hostile_input_and_exits_1_without_a_traceback(corpus):
    qa = corpus / "qa_pairs.jsonl"
    with open(qa, "a", encoding="utf-8") as f:
        f.write("\n".join([BIG_INT, DEEP_JSON, SURROGATE_ROW]) + "\n")
    deep = _doc(corpus / "erp_docs", "zz_deep.md", "title: " + "[" * 200_000 + "\nmodule: finance\nlang: en")
    proc = subprocess.run([sys.executable, "-m", "erpops.cli", "validate", "--recipe",
                           str(REPO / "recipes" / "tiny" / "test.yaml"), "--data", str(corpus), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    got = {(v["file"], v["line"], v["rule"]) for v in json.loads(proc.stdout)["violations"]}
    assert got == {(str(qa), 41, "json.parse"), (str(qa), 42, "json.parse"), (str(qa), 43, "encoding.utf8"),
                   (str(deep), 1, "doc.front_matter")}


def test_feedback_with_a_line_separator_in_the_question_lands(corpus):
    from data_contracts.curation import land_feedback

    landed = land_feedback(data_cfg(corpus), CORRECTIONS, "tester")
    assert landed.rejected == []
    assert [r["trace_id"] for r in landed.accepted] == [c["trace_id"] for c in CORRECTIONS]
    assert "\u2028in a closed" in landed.accepted[0]["instruction"]
    assert [r.data["trace_id"] for r in load_jsonl(landed.file)[0]] == [c["trace_id"] for c in CORRECTIONS]


def test_a_violation_at_no_row_of_the_export_is_not_blamed_on_a_row(corpus, monkeypatch):
    from data_contracts import curation
    from data_contracts.report import DataContractError, Violation

    real = curation.check_corpus

    def with_a_stray_line(cfg, tokenizer=None):
        report, rows, ds = real(cfg, tokenizer)
        for export in (cfg.root / cfg.feedback).glob("feedback-*.jsonl"):  # the staged export: one row, one line
            report.violations.append(Violation("json.parse", str(export.resolve()), 2, "not valid JSON"))
            ds = None
        return report, rows, ds

    monkeypatch.setattr(curation, "check_corpus", with_a_stray_line)
    with pytest.raises(DataContractError, match="json.parse"):
        curation.land_feedback(data_cfg(corpus), CORRECTIONS[1:], "tester")
    assert not (corpus / "feedback").exists()
