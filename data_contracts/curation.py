"""Users' corrected answers into training data, through the same contracts as every other row.

    erpops feedback export [--since 30d]      # corrected answers -> <data root>/feedback/feedback-<time>.jsonl

A corrected answer (serving.feedback: the expectation on a chat's MLflow trace) becomes a qa_pairs row: the
question as the instruction, the correction as the response, the module of the document the answer cited, the
question's language, and the trace id (lineage: which traces went in). Rows are refused, each with its trace and
rule, when they carry no module or language, repeat a trace already exported, or repeat (exactly or nearly) an
instruction the data already has. The rest go through `check_corpus` with the whole corpus: schema, GX suite,
template tokens, PII (masked or refused per `data.pii_policy`), language share, length, and the eval-overlap rule
(a feedback row never repeats an eval example). What passes lands as one new file, written whole (a staging
folder, then a rename), with a manifest beside it (traces, refusals, dataset digest before and after). Every
training run reads every file there, so the next retrain (the nightly deployment) trains on the newest
accepted version, and its lineage tag `dataset_digest` names it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from data_contracts.contracts import check_corpus
from data_contracts.report import DataContractError
from data_contracts.rules import detect_language, first_user_text, lang_agrees, near_duplicate_pairs, normalize
from erpops.config import DataConfig


@dataclass(frozen=True)
class Rejected:
    trace_id: str
    rule: str
    detail: str


@dataclass
class Landed:
    file: Path | None
    """The new feedback file (None: nothing passed)."""
    manifest: Path | None
    accepted: list[dict] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    digest_before: str = ""
    digest_after: str = ""

    def to_dict(self) -> dict:
        return {"file": str(self.file) if self.file else None, "manifest": str(self.manifest) if self.manifest else None,
                "accepted": len(self.accepted), "traces": [r["trace_id"] for r in self.accepted],
                "rejected": [asdict(r) for r in self.rejected], "dataset_digest_before": self.digest_before,
                "dataset_digest_after": self.digest_after}


def candidate_rows(corrections: Sequence[dict], doc_modules: dict[str, str],
                   exported: set[str], lang_min_share: float = 0.5) -> tuple[list[dict], list[Rejected]]:
    """{trace_id, question, correction, sources: [doc, ...]} (newest last) -> qa_pairs rows and refusals. Pure.
    One row per trace (its newest correction); a trace already in the data is refused. A row's `lang` is the one
    the corpus contract will hold it to (`lang_min_share` of the question's and the correction's letters in its
    script), so a question mixing Korean and English ERP terms is labelled as it will be checked."""
    newest = {c["trace_id"]: c for c in corrections if c.get("correction")}
    rows, rejected = [], []
    for trace_id, c in newest.items():
        question, correction = (c.get("question") or "").strip(), c["correction"].strip()
        module = next((doc_modules[d] for d in c.get("sources") or () if d in doc_modules), None)
        lang = detect_language(question)
        if lang in ("ko", "en") and not lang_agrees(lang, f"{question} {correction}", lang_min_share)[0]:
            other = "en" if lang == "ko" else "ko"
            lang = other if lang_agrees(other, f"{question} {correction}", lang_min_share)[0] else "mixed"
        why = ("feedback.exported", f"trace {trace_id} is already in the data") if trace_id in exported else \
            ("feedback.question", "the trace holds no question") if not question else \
            ("feedback.module", "the answer cited no document of the corpus, so its module is unknown") if module is None \
            else ("feedback.language", f"neither Korean nor English holds {lang_min_share:.0%} of the letters of the "
                                       f"question and its correction") if lang == "mixed" \
            else ("feedback.language", "the question is in neither Korean nor English") if lang not in ("ko", "en") \
            else None
        if why:
            rejected.append(Rejected(trace_id, *why))
            continue
        rows.append({"id": f"fb-{trace_id.removeprefix('tr-')[:16]}", "module": module, "lang": lang,
                     "instruction": question, "response": correction,
                     "source": next(d for d in c["sources"] if d in doc_modules), "trace_id": trace_id})
    return rows, rejected


def _dedup(rows: list[dict], existing: list[str], threshold: float) -> tuple[list[dict], list[Rejected]]:
    """Refuse rows whose instruction repeats, exactly or nearly, one the data has (or an earlier candidate's)."""
    seen = {normalize(t) for t in existing}
    kept, rejected = [], []
    for r in rows:
        if normalize(r["instruction"]) in seen:
            rejected.append(Rejected(r["trace_id"], "duplicate.exact", "the instruction is already in the data"))
        else:
            seen.add(normalize(r["instruction"]))
            kept.append(r)
    texts = existing + [r["instruction"] for r in kept]
    near = {j - len(existing) for _, j, _ in near_duplicate_pairs(texts, threshold) if j >= len(existing)}
    for j in sorted(near):
        rejected.append(Rejected(kept[j]["trace_id"], "duplicate.near",
                                 f"the instruction is over {threshold:.0%} similar to one the data has"))
    return [r for j, r in enumerate(kept) if j not in near], rejected


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """One row a line: line n holds rows[n - 1] (json.dumps escapes every newline inside a value)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def land_feedback(cfg: DataConfig, corrections: Sequence[dict], actor: str, tokenizer=None,
                  now: datetime | None = None) -> Landed:
    """Curate `corrections` (see candidate_rows) into a new feedback file of the corpus at `cfg.root`. Raises
    DataContractError when the corpus fails its contracts before anything is added (nothing is written)."""
    report, corpus, ds = check_corpus(cfg, tokenizer)
    if ds is None:
        raise DataContractError(report)
    now = now or datetime.now(timezone.utc)
    folder = cfg.root / cfg.feedback
    exported = {r.get("trace_id") for r in corpus.feedback}
    doc_modules = {d["file"]: d["module"] for d in corpus.docs if d.get("file")}
    doc_modules.update({Path(f).stem: m for f, m in list(doc_modules.items())})
    rows, rejected = candidate_rows(corrections, doc_modules, exported, cfg.lang_min_share)
    existing = [first_user_text(e) for e in ds.train]  # eval overlap: the contract's rule
    rows, dups = _dedup(rows, existing, cfg.near_duplicate_threshold)
    rejected += dups
    out = Landed(None, None, [], rejected, ds.digest, ds.digest)
    if not rows:
        return out
    name = f"feedback-{now.strftime('%Y%m%d-%H%M%S')}"
    staging = cfg.root / f".{cfg.feedback}-staging-{name}"
    staging.mkdir(parents=True)
    try:
        for f in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            shutil.copy2(f, staging / f.name)
        path = (staging / f"{name}.jsonl").resolve()  # the contracts name files by the resolved staging path
        staged = cfg.model_copy(update={"feedback": str(staging.resolve())})
        for _ in range(len(rows) + 1):  # each pass drops the rows the contracts refused; then check again
            _write_jsonl(path, rows)
            row_at = dict(enumerate(rows, start=1))
            report, corpus, ds = check_corpus(staged, tokenizer)
            bad = {}
            for v in report.violations:
                refuses = v.severity == "error" or v.rule.startswith("duplicate.")
                if refuses and v.line in row_at and Path(v.file).resolve() == path:
                    bad.setdefault(v.line, v)
            if not bad and ds is not None:
                break
            if not bad:  # a failure elsewhere, or at no row of this export: not this export's to fix
                raise DataContractError(report)
            for line, v in sorted(bad.items()):
                out.rejected.append(Rejected(row_at[line]["trace_id"], v.rule, v.detail))
            rows = [r for i, r in enumerate(rows, 1) if i not in bad]
            if not rows:
                return out
        accepted = [{k: v for k, v in r.items() if k not in ("_line", "_file")}
                    for r in corpus.feedback if Path(r["_file"]).resolve() == path]  # as checked: PII masked
        _write_jsonl(path, accepted)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / f"{name}.manifest.json"
        out.accepted, out.digest_after = accepted, ds.digest
        out.file, out.manifest = folder / f"{name}.jsonl", manifest
        manifest.write_text(json.dumps({"version": name, "created_at": now.isoformat(timespec="seconds"),
                                        "actor": actor, **out.to_dict()}, indent=2, ensure_ascii=False),
                            encoding="utf-8")
        os.replace(path, out.file)  # the rows appear whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
