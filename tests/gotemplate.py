"""A small interpreter for the subset of Go's text/template that Ollama Modelfile TEMPLATEs use here:
text, `{{- ... -}}` trimming, `range .Messages`, `if` / `else` / `end`, `.Role`, `.Content`, `.System`,
variables (`$x := v`, `$x = v`), `eq`, `and`, `not`, string and bool literals. Test helper only:
it lets a test render the Modelfile template the way Ollama would, without an Ollama server.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(src: str):
    out, pos = [], 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1) == "-":
            text = text.rstrip()
        if out and out[-1][0] == "trim_next":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        if m.group(3) == "-":
            out.append(("trim_next", ""))
        pos = m.end()
    text = src[pos:]
    if out and out[-1][0] == "trim_next":
        out.pop()
        text = text.lstrip()
    out.append(("text", text))
    return out


def _parse(tokens, i=0, stop=("end",)):
    """Nodes until one of `stop`; returns (nodes, index of the stop action, the stop keyword)."""
    nodes = []
    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        word = val.split(" ", 1)[0]
        if word in stop:
            return nodes, i, word
        if word == "range":
            body, i, _ = _parse(tokens, i + 1)
            nodes.append(("range", val[6:].strip(), body))
            i += 1
        elif word == "if":
            then, i, kw = _parse(tokens, i + 1, ("else", "end"))
            other = []
            if kw == "else":
                other, i, _ = _parse(tokens, i + 1)
            nodes.append(("if", val[3:].strip(), then, other))
            i += 1
        else:
            nodes.append(("expr", val))
            i += 1
    return nodes, i, None


def _split_args(expr: str) -> list[str]:
    return re.findall(r'"(?:[^"\\]|\\.)*"|\([^()]*\)|\S+', expr)


def _eval(expr: str, dot, env: dict):
    expr = expr.strip()
    if expr.startswith("(") and expr.endswith(")"):
        return _eval(expr[1:-1], dot, env)
    args = _split_args(expr)
    if len(args) > 1:
        fn, rest = args[0], [_eval(a, dot, env) for a in args[1:]]
        if fn == "eq":
            return rest[0] == rest[1]
        if fn == "and":
            return all(rest)
        if fn == "or":
            return any(rest)
        if fn == "not":
            return not rest[0]
        raise ValueError(f"unsupported function {fn!r}")
    a = args[0]
    if a.startswith('"'):
        return bytes(a[1:-1], "utf-8").decode("unicode_escape")
    if a in ("true", "false"):
        return a == "true"
    if a.startswith("$"):
        return env[a]
    if a.startswith("."):
        value = dot
        for part in a[1:].split("."):
            value = value.get(part) if isinstance(value, dict) else getattr(value, part)
        return value
    raise ValueError(f"unsupported operand {a!r}")


def _run(nodes, dot, root, env, out):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "range":
            for item in _eval(node[1], dot, env) or []:
                _run(node[2], item, root, env, out)
        elif kind == "if":
            _run(node[2] if _eval(node[1], dot, env) else node[3], dot, root, env, out)
        else:
            m = re.match(r"^(\$\w+)\s*(:?=)\s*(.+)$", node[1])
            if m:
                env[m.group(1)] = _eval(m.group(3), dot, env)
            else:
                value = _eval(node[1], dot, env)
                out.append("" if value is None else str(value))


def render(template: str, data: dict) -> str:
    nodes, _, _ = _parse(_tokens(template))
    out: list[str] = []
    _run(nodes, data, data, {"$": data}, out)
    return "".join(out)


def ollama_messages(messages: list[dict], system: str | None) -> list[dict]:
    """What Ollama puts in .Messages (Go fields Role, Content): the Modelfile SYSTEM first when the
    request carries none."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    return [{"Role": m["role"], "Content": m["content"]} for m in messages]
