"""Stage 1, validate: data contracts, then the deterministic train/eval split and its digest.

    erpops validate --recipe recipes/smollm2-135m/cpu.yaml
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from data_contracts.contracts import check_corpus
from data_contracts.report import DataContractError, ValidationReport
from erpops.config import DataConfig
from erpops.tracking import Tracker, write_json

log = logging.getLogger(__name__)


@dataclass
class ValidateResult:
    report: ValidationReport
    train_path: Path
    eval_path: Path
    docs: list[dict]
    """Validated documents (file, title, module, lang, body) for the knowledge base."""
    digest: str
    n_train: int
    n_eval: int
    feedback: tuple[str, ...] = ()
    """Curated feedback versions read (file stems under data.feedback, oldest first): the model's lineage."""
    feedback_rows: int = 0


def validate_data(cfg: DataConfig, out_dir: Path, tracker: Tracker | None = None, tokenizer=None) -> ValidateResult:
    """Check every contract; on a blocking failure log the report and raise DataContractError."""
    report, corpus, ds = check_corpus(cfg, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "data_report.json", report.to_dict())
    write_json(out_dir / "gx_results.json", report.gx_results)
    masked = sum(1 for v in report.violations if v.rule == "pii.masked")
    if tracker:
        tracker.log_dict(report.to_dict(), "data_contracts/report.json")
        tracker.log_dict(report.gx_results, "data_contracts/gx_results.json")
        tracker.log_metrics({"data/errors": len(report.errors), "data/warnings": len(report.violations) - len(report.errors),
                             "data/pii_masked_rows": masked})
    if ds is None:
        if tracker:
            tracker.set_tags({"data_contract": "failed"})
        raise DataContractError(report)

    paths = ds.write(out_dir)
    docs = [{k: v for k, v in d.items() if k not in ("_line", "_file")} for d in corpus.docs]
    log.info("data contracts pass: %d train / %d eval examples, %d docs, digest %s (%d warnings, %d rows masked)",
             len(ds.train), len(ds.eval), len(docs), ds.digest[:12], len(report.violations), masked)
    if tracker:
        tracker.set_tags({"data_contract": "passed", "dataset.digest": ds.digest})
        tracker.log_metrics({"data/train_examples": len(ds.train), "data/eval_examples": len(ds.eval),
                             "data/docs": len(docs)})
        tracker.log_input("erp-train", ds.digest, ds.train, str(cfg.root.resolve()), "training")
        tracker.log_input("erp-eval", ds.digest, ds.eval, str(cfg.root.resolve()), "evaluation")
    feedback = tuple(sorted({Path(r["_file"]).stem for r in corpus.feedback}))
    return ValidateResult(report, paths["train"], paths["eval"], docs, ds.digest, len(ds.train), len(ds.eval), feedback,
                          len(corpus.feedback))
