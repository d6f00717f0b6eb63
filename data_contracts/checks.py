"""Row-level rules Great Expectations cannot express, reported as the same Violations."""

from __future__ import annotations

from data_contracts.loaders import Row
from data_contracts.report import Violation

QA_REQUIRED = {"id": str, "module": str, "lang": str, "instruction": str, "response": str}
QA_OPTIONAL = {"context": str, "source": str, "trace_id": str}
CHAT_REQUIRED = {"id": str, "module": str, "lang": str, "messages": list}
DOC_REQUIRED = {"title": str, "module": str, "lang": str}
DOC_OPTIONAL = {"file": str, "body": str}

# Control tokens of common chat templates: text containing them would forge turns after formatting.
TEMPLATE_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "[INST]", "[/INST]",
    "<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>", "<|eot_id|>",
)


def check_schema(file: str, row: Row, required: dict, optional: dict | None = None) -> list[Violation]:
    """Missing fields, extra fields and wrong types, one violation each."""
    out = []
    optional = optional or {}
    for key, typ in required.items():
        if key not in row.data or row.data[key] is None:
            out.append(Violation("schema.required", file, row.line, f"missing field {key!r}"))
        elif not isinstance(row.data[key], typ):
            out.append(Violation("schema.type", file, row.line, f"field {key!r} must be {typ.__name__}, got {type(row.data[key]).__name__}"))
    for key, value in row.data.items():
        if key in required:
            continue
        if key not in optional:
            out.append(Violation("schema.extra_field", file, row.line, f"unexpected field {key!r}"))
        elif value is not None and not isinstance(value, optional[key]):
            out.append(Violation("schema.type", file, row.line, f"field {key!r} must be {optional[key].__name__}, got {type(value).__name__}"))
    return out


def check_chat_structure(file: str, row: Row) -> list[Violation]:
    """Optional leading system message, then user/assistant alternating, ending with assistant."""
    messages = row.data.get("messages")
    if not isinstance(messages, list):
        return []  # reported by check_schema
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            out.append(Violation("chat.message", file, row.line, f"message {i} must be an object with exactly 'role' and 'content'"))
        elif not isinstance(m["content"], str) or not isinstance(m["role"], str):
            out.append(Violation("chat.message", file, row.line, f"message {i}: role and content must be strings"))
    if out:
        return out
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    for i, role in enumerate(body):
        if role != expected[i]:
            offset = len(roles) - len(body)
            out.append(Violation("chat.roles", file, row.line, f"message {i + offset} has role {role!r}, expected {expected[i]!r} (user/assistant must alternate after an optional system message)"))
            return out
    if not body or body[-1] != "assistant":
        out.append(Violation("chat.roles", file, row.line, "conversation must end with an assistant message"))
    return out


def texts_of(data: dict) -> list[tuple[str, str]]:
    """(field, text) pairs of every free-text value of a row."""
    out = []
    for key in ("instruction", "response", "context", "title", "body"):
        if isinstance(data.get(key), str):
            out.append((key, data[key]))
    messages = data.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            out.append((f"messages[{i}]", m["content"]))
    return out


def check_template_tokens(file: str, row: Row, extra_tokens: tuple[str, ...] = ()) -> list[Violation]:
    """No chat-template control token inside any text."""
    out = []
    tokens = TEMPLATE_TOKENS + tuple(t for t in extra_tokens if t not in TEMPLATE_TOKENS)
    for field, text in texts_of(row.data):
        found = [t for t in tokens if t in text]
        if found:
            out.append(Violation("text.template_token", file, row.line, f"{field} contains chat-template control token(s) {found}"))
    return out


def set_text(data: dict, field: str, value: str) -> None:
    """Write back a text found by texts_of (e.g. `messages[2]`)."""
    if field.startswith("messages["):
        data["messages"][int(field[9:-1])]["content"] = value
    else:
        data[field] = value


def check_pii(file: str, row: Row, policy: str) -> list[Violation]:
    """Personal data: an error per kind under `reject`; under `mask` the text is masked in place and a
    warning says what was masked."""
    from collections import Counter

    from data_contracts.rules import find_pii, mask_pii

    out = []
    totals: Counter = Counter()
    for field, text in texts_of(row.data):
        if policy == "reject":
            kinds = sorted({k for k, _, _ in find_pii(text)})
            if kinds:
                out.append(Violation("pii.found", file, row.line, f"{field} contains personal data: {', '.join(kinds)}"))
        else:
            masked, counts = mask_pii(text)
            if counts:
                set_text(row.data, field, masked)
                totals.update(counts)
    if totals:
        out.append(Violation("pii.masked", file, row.line,
                             "masked " + ", ".join(f"{n} {k}" for k, n in sorted(totals.items())), "warning"))
    return out


def check_language(file: str, row: Row, min_share: float) -> list[Violation]:
    """`lang` must agree with the script of the row's text (Hangul for ko, Latin for en)."""
    from data_contracts.rules import lang_agrees

    lang = row.data.get("lang")
    if lang not in ("ko", "en"):
        return []  # the GX enum rule reports it
    text = " ".join(t for f, t in texts_of(row.data) if f != "context")
    ok, share = lang_agrees(lang, text, min_share)
    if ok:
        return []
    script = "Hangul" if lang == "ko" else "Latin"
    got = share if lang == "ko" else 1 - share
    return [Violation("lang.script", file, row.line, f"lang is {lang!r} but only {got:.0%} of letters are {script} (needs {min_share:.0%})")]
