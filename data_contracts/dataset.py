"""Training examples from the validated sources, a deterministic split, and a content digest.

Split: an example goes to eval when sha256("<seed>:<id>") falls below `eval_fraction`. It depends on
the id alone, so it is the same on every machine, whatever the row order, and adding rows never moves
existing examples between train and eval.

Digest: sha256 over the sorted, canonical JSON of every example. Row order in the files does not
change it; any change of content, id, module or language does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SplitDataset:
    train: list[dict]
    eval: list[dict]
    digest: str
    """Content digest of all examples (train + eval)."""

    def write(self, folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, rows in (("train", self.train), ("eval", self.eval)):
            paths[name] = folder / f"{name}.jsonl"
            with open(paths[name], "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return paths


def read_examples(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def qa_to_example(row: dict) -> dict:
    """A QA pair as a two-turn conversation; an optional context goes before the question."""
    question = row["instruction"]
    if row.get("context"):
        question = f"{row['context']}\n\n{question}"
    return {
        "id": row["id"], "module": row["module"], "lang": row["lang"], "source": "qa_pairs",
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": row["response"]}],
    }


def chat_to_example(row: dict) -> dict:
    """A chat log as-is: multi-turn; the loss falls on every assistant turn."""
    return {"id": row["id"], "module": row["module"], "lang": row["lang"], "source": "chat_logs",
            "messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}


def canonical(example: dict) -> str:
    return json.dumps(example, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_digest(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for line in sorted(canonical(e) for e in examples):
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def in_eval(example_id: str, seed: int, eval_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:8], "big")
    return bucket / 2**64 < eval_fraction


def build_dataset(qa_rows: list[dict], chat_rows: list[dict], seed: int, eval_fraction: float,
                  feedback_rows: list[dict] = ()) -> SplitDataset:
    """Train/eval by the id hash; curated feedback rows (users' corrections) always train: the eval set stays the
    one every champion was measured on."""
    examples = [qa_to_example(r) for r in qa_rows] + [chat_to_example(r) for r in chat_rows]
    examples += [dict(qa_to_example(r), source="feedback") for r in feedback_rows]
    examples.sort(key=lambda e: e["id"])
    train = [e for e in examples if e["source"] == "feedback" or not in_eval(e["id"], seed, eval_fraction)]
    evals = [e for e in examples if e["source"] != "feedback" and in_eval(e["id"], seed, eval_fraction)]
    return SplitDataset(train=train, eval=evals, digest=content_digest(examples))
