"""Apply the data contracts: Great Expectations suites (JSON in this folder) plus row-level checks.

    from data_contracts.contracts import validate_sources
    report, corpus = validate_sources(recipe.data)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from data_contracts import checks, rules
from data_contracts.loaders import Row, load_jsonl, load_markdown_docs
from data_contracts.report import ValidationReport, Violation
from erpops.config import DataConfig

SUITES_DIR = Path(__file__).parent


@dataclass
class Corpus:
    """Rows that passed the row-level schema checks, per source."""

    qa_pairs: list[dict] = field(default_factory=list)
    chat_logs: list[dict] = field(default_factory=list)
    docs: list[dict] = field(default_factory=list)
    feedback: list[dict] = field(default_factory=list)
    """Curated feedback rows (qa_pairs' schema), each with `_file` and `_line`."""


def load_suite(name: str):
    import great_expectations as gx

    with open(SUITES_DIR / f"{name}.json", encoding="utf-8") as f:
        return gx.ExpectationSuite(**json.load(f))


def _gx_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def run_suite(ctx, name: str, where: list[tuple[str, int]], frame_rows: list[dict],
              source: str | None = None) -> tuple[list[Violation], dict]:
    """Validate a frame with the named suite; map GX's unexpected row indexes back to (file, line). `source`:
    the data source's name in the context (default the suite's; unique per file checked)."""
    import pandas as pd

    suite = load_suite(name)
    df = pd.DataFrame(frame_rows)
    for exp in suite.expectations:  # a column absent from every row is still a column of nulls
        column = exp.kwargs.get("column") if hasattr(exp, "kwargs") else None
        if column and column not in df.columns:
            df[column] = None
    asset = ctx.data_sources.add_pandas(f"erp-{source or name}").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(suite, result_format="COMPLETE")
    violations = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        rule = (cfg.meta or {}).get("rule") or cfg.type
        column = cfg.kwargs.get("column")
        indexes = r.result.get("unexpected_index_list")
        if indexes is None:
            file = where[0][0] if where else name
            violations.append(Violation(f"gx.{rule}", file, None, f"{cfg.type} failed: {r.result.get('observed_value')}"))
            continue
        for idx in indexes:
            i = idx if isinstance(idx, int) else idx.get("index") if isinstance(idx, dict) else idx
            value = df.at[i, column] if column in df.columns else None
            shown = repr(value)[:80]
            file, line = where[i]
            violations.append(Violation(f"gx.{rule}", file, line, f"{cfg.type} on {column!r}: {shown}"))
    return violations, result.to_json_dict()


def _chat_frame(data: dict) -> dict:
    msgs = [m for m in data["messages"] if isinstance(m, dict)]
    lengths = [len(m.get("content") or "") for m in msgs] or [0]
    return {"id": data["id"], "module": data["module"], "lang": data["lang"],
            "n_messages": len(msgs), "min_chars": min(lengths), "max_chars": max(lengths)}


def validate_sources(cfg: DataConfig, extra_template_tokens: tuple[str, ...] = ()) -> tuple[ValidationReport, Corpus]:
    """Load and check all three sources (and the feedback files); never raises on bad data, the report says what
    is wrong. An id must be unique across them all (`id.duplicate`)."""
    report = ValidationReport()
    corpus = Corpus()
    ctx = _gx_context()
    sources = [
        ("qa_pairs", "qa_pairs", cfg.root / cfg.qa_pairs, load_jsonl, checks.QA_REQUIRED, checks.QA_OPTIONAL,
         corpus.qa_pairs),
        ("chat_logs", "chat_logs", cfg.root / cfg.chat_logs, load_jsonl, checks.CHAT_REQUIRED, {}, corpus.chat_logs),
        ("erp_docs", "erp_docs", cfg.root / cfg.docs, load_markdown_docs, checks.DOC_REQUIRED, checks.DOC_OPTIONAL,
         corpus.docs),
    ]
    sources += [("feedback", "qa_pairs", path, load_jsonl, checks.QA_REQUIRED, checks.QA_OPTIONAL, corpus.feedback)
                for path in sorted((cfg.root / cfg.feedback).glob("*.jsonl"))]
    for label, name, path, loader, required, optional, keep in sources:
        rows, violations = loader(path)
        report.violations += violations
        report.counts[label] = report.counts.get(label, 0) + len(rows)
        good: list[Row] = []
        for row in rows:
            file = str(path / row.data["file"]) if name == "erp_docs" else str(path)
            row_violations = checks.check_schema(file, row, required, optional)
            if name == "chat_logs" and not row_violations:
                row_violations += checks.check_chat_structure(file, row)
            row_violations += checks.check_template_tokens(file, row, extra_template_tokens)
            if not any(v.rule.startswith("schema.") for v in row_violations):
                row_violations += checks.check_pii(file, row, cfg.pii_policy)
                row_violations += checks.check_language(file, row, cfg.lang_min_share)
            report.violations += row_violations
            if not any(v.rule.startswith(("schema.", "chat.")) for v in row_violations):
                good.append(row)
        if not good:
            continue
        frame = [_chat_frame(r.data) if name == "chat_logs" else r.data for r in good]
        where = [(str(path / r.data["file"]) if name == "erp_docs" else str(path), r.line) for r in good]
        source = name if label == name else f"{label}-{path.name}"
        gx_violations, gx_result = run_suite(ctx, name, where, frame, source)
        report.violations += gx_violations
        report.gx_results[source] = gx_result
        keep.extend(dict(r.data, _line=r.line, _file=str(path)) for r in good)
    report.violations += rules.duplicate_id_violations(corpus.qa_pairs + corpus.chat_logs + corpus.feedback)
    return report, corpus


def check_corpus(cfg: DataConfig, tokenizer=None):
    """Every contract: sources (GX + row rules), then the split dataset (duplicates, leakage, coverage,
    token length when a tokenizer is given). Returns (report, corpus, dataset or None when blocked)."""
    from data_contracts.dataset import build_dataset
    from erpops.config import MODULES

    extra = tuple(tokenizer.all_special_tokens) if tokenizer is not None else ()
    report, corpus = validate_sources(cfg, extra)
    if not report.ok:
        return report, corpus, None
    qa_file, chat_file = str(cfg.root / cfg.qa_pairs), str(cfg.root / cfg.chat_logs)
    where = {r["id"]: (qa_file, r["_line"]) for r in corpus.qa_pairs}
    where.update({r["id"]: (chat_file, r["_line"]) for r in corpus.chat_logs})
    where.update({r["id"]: (r["_file"], r["_line"]) for r in corpus.feedback})
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("_line", "_file")} for r in rows]  # noqa: E731
    ds = build_dataset(strip(corpus.qa_pairs), strip(corpus.chat_logs), cfg.split_seed, cfg.eval_fraction,
                       strip(corpus.feedback))
    train = [rules.Located(*where[e["id"]], e) for e in ds.train]
    evals = [rules.Located(*where[e["id"]], e) for e in ds.eval]
    report.violations += rules.duplicate_violations(train, cfg.near_duplicate_threshold)
    report.violations += rules.leakage_violations([x for x in train if x.example["source"] != "feedback"], evals,
                                                  cfg.near_duplicate_threshold)
    report.violations += rules.eval_overlap_violations([x for x in train if x.example["source"] == "feedback"], evals,
                                                       cfg.near_duplicate_threshold)
    report.violations += rules.coverage_violations(train, cfg.min_examples_per_module, MODULES, qa_file)
    if tokenizer is not None:
        report.violations += rules.length_violations(train + evals, tokenizer, cfg.max_seq_len)
    report.counts.update({"train": len(ds.train), "eval": len(ds.eval)})
    return report, corpus, (ds if report.ok else None)
