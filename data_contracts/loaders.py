"""Loaders that never raise on bad bytes: every defect becomes a Violation with file, line and rule."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from data_contracts.report import Violation

BOM = b"\xef\xbb\xbf"
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Row:
    line: int
    """1-based line number in the source file."""
    data: dict


def _decode(path: Path, raw: bytes, violations: list[Violation]) -> str | None:
    name = str(path)
    if raw.startswith(BOM):
        violations.append(Violation("encoding.bom", name, 1, "file starts with a UTF-8 byte-order mark; it was ignored", "warning"))
        raw = raw[len(BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        hint = ""
        try:
            raw.decode("cp949")
            hint = " (it decodes as CP949/EUC-KR: re-export the file as UTF-8)"
        except UnicodeDecodeError:
            pass
        violations.append(Violation("encoding.utf8", name, line, f"invalid UTF-8 at byte {e.start}{hint}"))
        return None


def surrogate_field(data: dict) -> str | None:
    """The name (as `ascii` writes it) of the top-level field whose key or value, at any depth, holds a lone UTF-16
    surrogate; None when none does. Escapes such as `\\ud800` (JSON) or `\\U0000d800` (YAML) decode to one: it is
    no character, and UTF-8 cannot encode it."""
    for key, value in data.items():
        stack, seen = [key, value], set()
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                if SURROGATE.search(item):
                    return ascii(key)
            elif isinstance(item, (dict, list)) and id(item) not in seen:  # YAML anchors can make cycles
                seen.add(id(item))
                stack.extend([*item.keys(), *item.values()] if isinstance(item, dict) else item)
    return None


def _surrogate_violation(file: str, line: int, field: str) -> Violation:
    return Violation("encoding.utf8", file, line, f"field {field} holds a lone UTF-16 surrogate escape (such as "
                     "\\ud800): it is not a character and cannot be written as UTF-8")


def read_text(path: Path, violations: list[Violation]) -> str | None:
    """The file's text, or None with a violation when it is missing, unreadable or not UTF-8."""
    if not path.is_file():
        violations.append(Violation("file.missing", str(path), None, "file does not exist"))
        return None
    try:
        raw = path.read_bytes()
    except OSError as e:
        violations.append(Violation("file.unreadable", str(path), None, str(e)))
        return None
    return _decode(path, raw, violations)


def load_jsonl(path: Path) -> tuple[list[Row], list[Violation]]:
    """JSON objects, one a line; blank lines are skipped, anything else bad is a violation. Lines end at "\\n"
    (or "\\r\\n") only: U+2028, U+2029 and U+0085 are characters inside a row, as JSON allows them raw."""
    violations: list[Violation] = []
    text = read_text(path, violations)
    if text is None:
        return [], violations
    rows: list[Row] = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            violations.append(Violation("json.parse", str(path), n, f"not valid JSON: {e.msg} at column {e.colno}"))
            continue
        except ValueError as e:  # an integer over Python's digit limit; its advice (raise the limit) is not for data
            why = str(e).partition("; use ")[0]
            violations.append(Violation("json.parse", str(path), n, f"cannot be read as JSON: {why}"))
            continue
        except RecursionError:
            violations.append(Violation("json.parse", str(path), n, "cannot be read as JSON: nested too deeply"))
            continue
        if not isinstance(value, dict):
            violations.append(Violation("json.object", str(path), n, f"expected a JSON object, got {type(value).__name__}"))
            continue
        field = surrogate_field(value) if "\\u" in line else None  # JSON writes a surrogate only as an escape
        if field:
            violations.append(_surrogate_violation(str(path), n, field))
            continue
        rows.append(Row(n, value))
    if not rows and not any(v.severity == "error" for v in violations):
        violations.append(Violation("file.empty", str(path), None, "no rows"))
    return rows, violations


def load_markdown_docs(folder: Path) -> tuple[list[Row], list[Violation]]:
    """Markdown files with YAML front matter; a row is {file, title, module, lang, body}. CRLF line endings are
    read as LF."""
    violations: list[Violation] = []
    if not folder.is_dir():
        return [], [Violation("file.missing", str(folder), None, "document folder does not exist")]
    rows: list[Row] = []
    for path in sorted(folder.glob("*.md")):
        text = read_text(path, violations)
        if text is None:
            continue
        text = text.replace("\r\n", "\n")
        if not text.startswith("---\n"):
            violations.append(Violation("doc.front_matter", str(path), 1, "missing YAML front matter (a first line '---')"))
            continue
        end = text.find("\n---", 4)
        if end < 0:
            violations.append(Violation("doc.front_matter", str(path), 1, "front matter is not closed by a '---' line"))
            continue
        try:
            meta = yaml.safe_load(text[4:end])
        except (yaml.YAMLError, ValueError) as e:  # ValueError: a value YAML types but Python refuses (2024-13-01)
            violations.append(Violation("doc.front_matter", str(path), 1, f"front matter is not valid YAML: {e}"))
            continue
        except RecursionError:
            violations.append(Violation("doc.front_matter", str(path), 1, "front matter is nested too deeply"))
            continue
        if not isinstance(meta, dict):
            violations.append(Violation("doc.front_matter", str(path), 1, "front matter is not a mapping"))
            continue
        field = surrogate_field(meta)
        if field:
            violations.append(_surrogate_violation(str(path), 1, field))
            continue
        body = text[end + 4:].lstrip("-").strip("\n")
        body_line = text[: end + 4].count("\n") + 2
        rows.append(Row(body_line, {**meta, "file": path.name, "body": body}))
    if not rows and not violations:
        violations.append(Violation("file.empty", str(folder), None, "no .md documents"))
    return rows, violations
