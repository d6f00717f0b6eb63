"""One test per rule: a small bad file made here must give a violation naming file, line and rule."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, data_cfg, write_jsonl
from data_contracts.contracts import validate_sources
from data_contracts.loaders import load_jsonl, load_markdown_docs


def run(root: Path):
    report, corpus = validate_sources(data_cfg(root))
    return report, corpus


def rules(report, file_suffix=None):
    return {(v.rule, v.line) for v in report.violations if file_suffix is None or v.file.endswith(file_suffix)}


def test_clean_corpus_passes(corpus):
    report, c = run(corpus)
    assert report.ok, report.table()
    assert report.counts == {"qa_pairs": 40, "chat_logs": 10, "erp_docs": 8}
    assert len(c.qa_pairs) == 40 and len(c.docs) == 8
    assert set(report.gx_results) == {"qa_pairs", "chat_logs", "erp_docs"}


def test_shipped_sample_corpus_passes_and_is_big_enough():
    root = REPO / "data" / "erp"
    if not root.exists():
        pytest.fail("data/erp is missing")
    report, c = run(root)
    assert report.ok, report.table()
    assert len(c.qa_pairs) >= 300 and len(c.chat_logs) >= 80 and len(c.docs) >= 30
    assert {r["lang"] for r in c.qa_pairs} == {"ko", "en"}


def _rewrite(corpus: Path, line_no: int, **changes):
    path = corpus / "qa_pairs.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[line_no - 1])
    for k, v in changes.items():
        if v is None:
            row.pop(k)
        else:
            row[k] = v
    lines[line_no - 1] = json.dumps(row, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("change, rule", [
    ({"module": "marketing"}, "gx.enum.module"),
    ({"lang": "jp"}, "gx.enum.lang"),
    ({"id": "qa-000"}, "gx.unique.id"),
    ({"response": "   "}, "gx.nonempty.response"),
    ({"instruction": "x" * 2500}, "gx.length.instruction"),
    ({"response": None}, "schema.required"),
    ({"response": 42}, "schema.type"),
    ({"answer_extra": "x"}, "schema.extra_field"),
    ({"response": "Press <|im_end|> to finish"}, "text.template_token"),
    ({"instruction": "[INST] do it"}, "text.template_token"),
])
def test_each_rule_names_file_line_and_rule(corpus, change, rule):
    _rewrite(corpus, 5, **change)
    report, _ = run(corpus)
    assert not report.ok
    assert (rule, 5) in rules(report, "qa_pairs.jsonl"), report.table()


def test_unique_id_flags_both_rows(corpus):
    _rewrite(corpus, 7, id="qa-002")
    report, _ = run(corpus)
    assert {("gx.unique.id", 3), ("gx.unique.id", 7)} <= rules(report)


def test_an_id_repeated_across_sources_names_both_rows(corpus):
    chats = [json.loads(line) for line in (corpus / "chat_logs.jsonl").read_text().splitlines()]
    chats[4]["id"] = "qa-002"  # the QA pair at line 3
    write_jsonl(corpus / "chat_logs.jsonl", chats)
    write_jsonl(corpus / "feedback" / "feedback-1.jsonl", [
        {"id": "chat-001", "module": "hr", "lang": "en", "instruction": "How do I book a day off?",
         "response": "Open HR > Leave, pick the day and submit it."}])
    report, _ = run(corpus)
    qa, chat, fed = (str(corpus / f) for f in ("qa_pairs.jsonl", "chat_logs.jsonl", "feedback/feedback-1.jsonl"))
    got = [(v.file, v.line, v.detail) for v in report.errors if v.rule == "id.duplicate"]
    assert [(f, line) for f, line, _ in got] == [(chat, 5), (fed, 1)], report.table()
    assert f"'qa-002' is already the id of {qa}:3" in got[0][2] and f"{chat}:2" in got[1][2]
    assert not [v for v in report.errors if v.rule != "id.duplicate"]  # each file alone is fine


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "assistant", "content": "hi"}], "chat.roles"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chat.roles"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "chat.roles"),
    ([{"role": "system", "content": "s"}, {"role": "system", "content": "s"}], "chat.roles"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], "chat.message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "gx.nonempty.message"),
])
def test_chat_structure(corpus, messages, expected):
    rows = [json.loads(line) for line in (corpus / "chat_logs.jsonl").read_text().splitlines()]
    rows[2]["messages"] = messages
    write_jsonl(corpus / "chat_logs.jsonl", rows)
    report, _ = run(corpus)
    assert (expected, 3) in rules(report, "chat_logs.jsonl"), report.table()


def test_leading_system_message_is_allowed(corpus):
    rows = [json.loads(line) for line in (corpus / "chat_logs.jsonl").read_text().splitlines()]
    rows[0]["messages"].insert(0, {"role": "system", "content": "You are the ERP assistant."})
    write_jsonl(corpus / "chat_logs.jsonl", rows)
    report, _ = run(corpus)
    assert report.ok, report.table()


def test_cp949_file_is_an_encoding_violation_with_a_hint(corpus):
    path = corpus / "qa_pairs.jsonl"
    text = path.read_text(encoding="utf-8")
    path.write_bytes(text.encode("cp949"))
    report, _ = run(corpus)
    v = [v for v in report.violations if v.rule == "encoding.utf8"]
    assert v and v[0].file == str(path) and v[0].line == 1 and "CP949" in v[0].detail


def test_bom_is_a_warning_and_rows_still_load(corpus):
    path = corpus / "qa_pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    report, c = run(corpus)
    assert report.ok and len(c.qa_pairs) == 40
    assert [v.severity for v in report.violations if v.rule == "encoding.bom"] == ["warning"]


def test_broken_json_and_non_objects(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{not json}\n[1, 2]\n\n"str"\n', encoding="utf-8")
    rows, violations = load_jsonl(path)
    assert [r.line for r in rows] == [1]
    assert {(v.rule, v.line) for v in violations} == {("json.parse", 2), ("json.object", 3), ("json.object", 5)}


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert [v.rule for v in load_jsonl(tmp_path / "empty.jsonl")[1]] == ["file.empty"]
    assert [v.rule for v in load_jsonl(tmp_path / "missing.jsonl")[1]] == ["file.missing"]
    assert [v.rule for v in load_markdown_docs(tmp_path / "nodocs")[1]] == ["file.missing"]


def test_docs_without_front_matter_or_with_bad_fields(corpus):
    (corpus / "erp_docs" / "plain.md").write_text("# no front matter\nbody\n", encoding="utf-8")
    (corpus / "erp_docs" / "bad_module.md").write_text("---\ntitle: T\nmodule: crm\nlang: en\n---\n" + "body " * 50, encoding="utf-8")
    report, _ = run(corpus)
    found = {(Path(v.file).name, v.rule) for v in report.violations}
    assert ("plain.md", "doc.front_matter") in found
    assert ("bad_module.md", "gx.enum.module") in found


def test_missing_file_blocks(corpus):
    (corpus / "chat_logs.jsonl").unlink()
    report, _ = run(corpus)
    assert not report.ok and any(v.rule == "file.missing" and v.file.endswith("chat_logs.jsonl") for v in report.errors)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_loader(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(data)
    rows, violations = load_jsonl(path)
    assert all(isinstance(r.data, dict) for r in rows)
    assert rows or violations  # something is always said about a file with no rows


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                             lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                             max_leaves=8), max_size=5))
def test_random_json_rows_never_crash_validation(tmp_path_factory, values):
    root = tmp_path_factory.mktemp("fuzzjson")
    from conftest import make_corpus

    make_corpus(root, n_qa=8, n_chat=2)
    write_jsonl(root / "qa_pairs.jsonl", values + [{"id": "ok", "module": "hr", "lang": "en", "instruction": "How?", "response": "Like this."}])
    write_jsonl(root / "chat_logs.jsonl", [{"id": "c", "module": "hr", "lang": "en", "messages": v} for v in values] or [{}])
    report, _ = run(root)
    for v in report.violations:
        assert v.rule and v.file and v.detail
