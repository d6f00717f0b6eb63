"""Corpus-level rules beside the GX suites: personal data, language/script, ids shared across sources, duplicates,
leakage, coverage and token length. Each returns Violations (file, line, rule) like every other check.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from data_contracts.report import Violation

# --- personal data -------------------------------------------------------------------------------

# What an e-mail address is; `email_spans` finds its matches without the regex's quadratic retries.
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
EMAIL_DOMAIN = re.compile(r"[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# Korean resident registration number: YYMMDD-GNNNNNN, G in 1-8 (1-4 citizens, 5-8 foreigners)
RRN = re.compile(r"(?<!\d)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?: ?- ?| )?[1-8]\d{6}(?!\d)")
# Korean mobile / area-code numbers (area code in brackets or not, separators with spaces around them) and
# international numbers with a leading +; not inside a longer run of digits and hyphens ("2024-010-..." is not one)
_SEP = r"(?: ?[-.] ?| )?"
PHONE = re.compile(
    r"(?<!\d)(?<!\d-)(?:"
    rf"\(?01[016789]\)?{_SEP}\d{{3,4}}{_SEP}\d{{4}}"
    rf"|\(?0(?:2|[3-6][1-5]|70)\)?{_SEP}\d{{3,4}}{_SEP}\d{{4}}"
    r"|\+\d{1,3}[- .]?(?:\(?\d{1,4}\)?[- .]?){2,4}\d{2,4}"
    r")(?!\d)(?!-\d)"
)
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
# The same text with full-width digits, dashes and spaces (what a Korean IME types in full-width mode, what word
# processors turn hyphens into) as ASCII, character for character: the patterns run on it, the spans fit the text
_ASCII = str.maketrans({**{chr(0xFF10 + d): str(d) for d in range(10)},
                        **{c: "-" for c in "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\uFE58\uFE63\uFF0D"},
                        "\u3000": " ", "\u00A0": " ", "\uFF08": "(", "\uFF09": ")", "\uFF0B": "+", "\uFF0E": "."})

PII_KINDS = ("email", "rrn", "card", "phone")
MASKS = {"email": "[EMAIL]", "rrn": "[RRN]", "card": "[CARD]", "phone": "[PHONE]"}


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def email_spans(text: str) -> Iterator[tuple[int, int]]:
    """The (start, end) of each match `EMAIL.finditer(text)` gives, in time linear in the text. Every match holds
    exactly one '@' (neither part's characters include it), so each '@' is tried once: its local part is the run
    of local characters before it (from the end of the previous match on), its domain `EMAIL_DOMAIN` matched
    right after it. The regex instead retries from every start in a long run of such characters: 80,000
    letters took 7 s, 160,000 took 26 s."""
    pos, at = 0, text.find("@")
    while at >= 0:
        start = at
        while start > pos and text[start - 1] in EMAIL_LOCAL:
            start -= 1
        domain = EMAIL_DOMAIN.match(text, at + 1) if start < at else None
        if domain:
            yield start, domain.end()
            pos = domain.end()
        at = text.find("@", pos if domain else at + 1)


def card_span(text: str, s: int, e: int) -> tuple[int, int] | None:
    """The card number in `text[s:e]` (a run of digits, spaces and hyphens): the whole run when its 13-19 digits
    pass the Luhn check, else the longest run of whole digit groups inside it that does (a card number with an
    order number or a year beside it: "4111 1111 1111 1111 12"); None when there is none."""
    digits = re.sub(r"\D", "", text[s:e])
    if 13 <= len(digits) <= 19 and luhn_ok(digits):
        return s, e
    groups = [(s + m.start(), s + m.end()) for m in re.finditer(r"\d+", text[s:e])]
    best = None
    for i in range(len(groups)):
        n = 0
        for j in range(i, len(groups)):
            n += groups[j][1] - groups[j][0]
            if n > 19:
                break
            if n >= 13 and (best is None or groups[j][1] - groups[i][0] > best[1] - best[0]) and \
                    luhn_ok(re.sub(r"\D", "", text[groups[i][0]:groups[j][1]])):
                best = (groups[i][0], groups[j][1])
    return best


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every personal-data match, most specific kinds first, no overlaps. Linear in the
    length of the text and in the number of matches."""
    found: list[tuple[str, int, int]] = []
    taken: list[tuple[int, int]] = []  # spans of the kinds already done: sorted, disjoint
    text = text.translate(_ASCII)  # same length: the spans are the original text's
    for kind, pattern in (("email", None), ("rrn", RRN), ("card", CARD), ("phone", PHONE)):
        spans = email_spans(text) if pattern is None else (m.span() for m in pattern.finditer(text))
        if kind == "card":
            spans = (c for s, e in spans if (c := card_span(text, s, e)) is not None)
        new, j = [], 0
        for s, e in spans:  # in increasing order, disjoint: one pass over `taken` beside them
            while j < len(taken) and taken[j][1] <= s:
                j += 1
            if j < len(taken) and taken[j][0] < e:
                continue
            found.append((kind, s, e))
            new.append((s, e))
        taken = sorted(taken + new)
    return sorted(found, key=lambda f: f[1])


def mask_pii(text: str) -> tuple[str, Counter]:
    counts: Counter = Counter()
    out, last = [], 0
    for kind, s, e in find_pii(text):
        out.append(text[last:s])
        out.append(MASKS[kind])
        counts[kind] += 1
        last = e
    out.append(text[last:])
    return "".join(out), counts


# --- language / script ---------------------------------------------------------------------------


HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
LATIN = re.compile(r"[A-Za-z]")


def hangul_share(text: str) -> float | None:
    """Hangul letters / (Hangul + Latin letters); None when the text has neither."""
    hangul, latin = len(HANGUL.findall(text)), len(LATIN.findall(text))
    total = hangul + latin
    return hangul / total if total else None


KO_MIN_HANGUL_SHARE = 0.3
"""A text is Korean from this Hangul share (evaluation/metrics/language_agreement.py says why 0.3)."""


def detect_language(text: str) -> str | None:
    """`ko`, `en`, or None for a text without Hangul or Latin letters."""
    share = hangul_share(text)
    if share is None:
        return None
    return "ko" if share >= KO_MIN_HANGUL_SHARE else "en"


def lang_agrees(lang: str, text: str, min_share: float) -> tuple[bool, float | None]:
    share = hangul_share(text)
    if share is None:
        return True, None
    if lang == "ko":
        return share >= min_share, share
    return (1 - share) >= min_share, share


# --- duplicates and leakage ----------------------------------------------------------------------


def duplicate_id_violations(rows: Sequence[dict]) -> list[Violation]:
    """An id that rows of different files share (a QA pair, a chat log, a feedback row): an error at each later
    row, naming the first one's file and line. Rows carry `_file` and `_line`, in source order; a repeat within one
    file is the GX suites' `unique.id` rule."""
    first: dict[str, dict] = {}
    out = []
    for r in rows:
        seen = first.setdefault(r["id"], r)
        if seen["_file"] != r["_file"]:
            out.append(Violation("id.duplicate", r["_file"], r["_line"],
                                 f"id {r['id']!r} is already the id of {seen['_file']}:{seen['_line']}; "
                                 "ids must be unique across qa_pairs, chat_logs and feedback"))
    return out


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[\W_]+", " ", text).strip()


def shingles(text: str, k: int = 3) -> set[str]:
    t = normalize(text).replace(" ", "")
    return {t[i:i + k] for i in range(max(1, len(t) - k + 1))} if t else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicate_pairs(texts: list[str], threshold: float, max_checks: int = 4,
                         split: int | None = None) -> list[tuple[int, int, float]]:
    """For each text with an earlier near-duplicate, one pair (i, j, similarity), i < j, with
    character-3-gram Jaccard >= threshold. Candidates come from MinHash LSH (they share a band of the
    signature) and are confirmed exactly. Linear in the number of texts. `split`: only pairs across it
    (i < split <= j: texts of two sets, the first set's before it), for each text of the second set.

    32 hashes; for thresholds from 0.8, 8 bands of 4 and candidates must share 2 bands (a pair at
    J=0.85 qualifies with probability ~0.97, one at 0.6 with ~0.28); below 0.8, 16 bands of 2.
    """
    import zlib

    import numpy as np

    rows = 4 if threshold >= 0.8 else 2
    bands = 32 // rows
    # at J=0.85 a pair shares >= 2 of 8 bands with probability ~0.97, at J=0.6 only ~0.28
    min_shared = 2 if rows == 4 else 1
    n_hash = bands * rows
    rng = np.random.default_rng(1234)
    prime = np.uint64((1 << 61) - 1)
    a = rng.integers(1, 1 << 31, n_hash, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, n_hash, dtype=np.uint64)
    sets = [shingles(t) for t in texts]
    buckets: dict[tuple, list[int]] = defaultdict(list)
    nonempty = [i for i, s in enumerate(sets) if s]
    for start in range(0, len(nonempty), 8192):  # signatures for a block of texts in one numpy pass
        block = nonempty[start:start + 8192]
        lengths = np.array([len(sets[i]) for i in block])
        h = np.fromiter((zlib.crc32(x.encode()) for i in block for x in sets[i]), dtype=np.uint64, count=int(lengths.sum()))
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        sigs = np.minimum.reduceat((h[:, None] * a[None, :] + b[None, :]) % prime, offsets, axis=0)
        for i, sig in zip(block, sigs.tolist()):
            for band in range(bands):
                buckets[(band, *sig[band * rows:(band + 1) * rows])].append(i)
    # For each text, the earlier texts sharing the most bands are checked first; one confirmed
    # near-duplicate per text is enough to report it, so templated corpora stay linear.
    members_of: dict[int, list[tuple]] = defaultdict(list)
    for key, members in buckets.items():
        for i in members:
            members_of[i].append(key)
    pairs = []
    for j in sorted(members_of):
        if split is not None and j < split:
            continue
        shared: Counter = Counter()
        for key in members_of[j]:
            bucket = buckets[key]
            pos = bisect.bisect_left(bucket, j if split is None else split)
            shared.update(bucket[max(0, pos - 16):pos])  # the nearest earlier members suffice
        for i, n in shared.most_common(max_checks):
            if n < min_shared:
                break
            sim = jaccard(sets[i], sets[j])
            if sim >= threshold:
                pairs.append((i, j, sim))
                break
    return pairs


@dataclass
class Located:
    """An example with where it came from."""

    file: str
    line: int
    example: dict
    extra: dict = field(default_factory=dict)


def first_user_text(example: dict) -> str:
    return next((m["content"] for m in example["messages"] if m["role"] == "user"), "")


def duplicate_violations(train: list[Located], threshold: float) -> list[Violation]:
    """Exact (after normalisation) and near-duplicate instructions within the training set: warnings."""
    out = []
    seen: dict[str, Located] = {}
    texts = [first_user_text(x.example) for x in train]
    for x, text in zip(train, texts):
        key = normalize(text)
        if key in seen:
            first = seen[key]
            out.append(Violation("duplicate.exact", x.file, x.line,
                                 f"instruction repeats {first.example['id']} ({first.file}:{first.line})", "warning"))
        else:
            seen[key] = x
    for i, j, sim in near_duplicate_pairs(texts, threshold):
        if normalize(texts[i]) == normalize(texts[j]):
            continue
        out.append(Violation("duplicate.near", train[j].file, train[j].line,
                             f"instruction is {sim:.0%} similar to {train[i].example['id']} ({train[i].file}:{train[i].line})",
                             "warning"))
    return out


MIN_TURN_CHARS = 16
"""A turn other than a conversation's first question and last answer counts for leakage from this many characters
(normalised) on: "네", "감사합니다" and "thanks" recur in unrelated conversations."""


def _turns(example: dict) -> Iterator[tuple[str, str]]:
    """("instruction" | "answer", normalised text) of every user and assistant turn that counts for leakage: the
    first question and the last answer always, the turns between from MIN_TURN_CHARS (training puts loss on every
    assistant turn, and a middle question can be another row's whole question)."""
    messages = [m for m in example["messages"] if m["role"] in ("user", "assistant")]
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    for i, m in enumerate(messages):
        key = normalize(m["content"])
        if key and (i == first_user or i == len(messages) - 1 or len(key) >= MIN_TURN_CHARS):
            yield ("instruction" if m["role"] == "user" else "answer"), key


def _texts_index(located: list[Located]) -> dict[tuple[str, str], Located]:
    """(kind, normalised turn) -> the first example holding it."""
    index: dict[tuple[str, str], Located] = {}
    for x in located:
        for turn in _turns(x.example):
            index.setdefault(turn, x)
    return index


def _overlap(example: dict, index: dict[tuple[str, str], Located]) -> tuple[str, Located] | None:
    """("instruction" | "answer", the indexed example it repeats), or None."""
    return next(((turn[0], index[turn]) for turn in _turns(example) if turn in index), None)


def _near(first: list[Located], second: list[Located], threshold: float | None) -> dict[int, tuple[Located, float]]:
    """For each example of `second` whose first question is a near-duplicate of one of `first`'s: (that one,
    similarity), by position in `second`."""
    if threshold is None or not first or not second:
        return {}
    texts = [first_user_text(x.example) for x in first + second]
    return {j - len(first): (first[i], sim) for i, j, sim in near_duplicate_pairs(texts, threshold, split=len(first))}


def leakage_violations(train: list[Located], evals: list[Located], threshold: float | None = None) -> list[Violation]:
    """An eval example one of whose questions or answers also appears in training data is leakage: an error. One
    whose question is a near-duplicate (`threshold`, 3-gram Jaccard) of a training question is a warning
    (`leakage.near`): templated ERP questions that differ in one word ("a purchase order" / "a sales order") can be
    that close and still be different questions, so it is shown, not blocking."""
    index, out = _texts_index(train), []
    near = _near(train, evals, threshold)
    for k, e in enumerate(evals):
        hit = _overlap(e.example, index)
        if hit:
            out.append(Violation("leakage.train_eval", e.file, e.line,
                                 f"eval example {e.example['id']} has the same {hit[0]} as training example "
                                 f"{hit[1].example['id']} ({hit[1].file}:{hit[1].line})"))
        elif k in near:
            x, sim = near[k]
            out.append(Violation("leakage.near", e.file, e.line,
                                 f"eval example {e.example['id']}'s question is {sim:.0%} similar to training example "
                                 f"{x.example['id']}'s ({x.file}:{x.line})", "warning"))
    return out


def eval_overlap_violations(candidates: list[Located], evals: list[Located],
                            threshold: float | None = None) -> list[Violation]:
    """A training row added from outside the split (curated feedback) one of whose questions or answers is an eval
    example's: an error at the added row (it would leak the eval set into training); one whose question is a
    near-duplicate of an eval question: a warning (`leakage.near`, as in `leakage_violations`)."""
    index, out = _texts_index(evals), []
    near = _near(evals, candidates, threshold)
    for k, x in enumerate(candidates):
        hit = _overlap(x.example, index)
        if hit:
            out.append(Violation("leakage.feedback_eval", x.file, x.line,
                                 f"{x.example['id']} has the same {hit[0]} as eval example {hit[1].example['id']} "
                                 f"({hit[1].file}:{hit[1].line})"))
        elif k in near:
            e, sim = near[k]
            out.append(Violation("leakage.near", x.file, x.line,
                                 f"{x.example['id']}'s question is {sim:.0%} similar to eval example "
                                 f"{e.example['id']}'s ({e.file}:{e.line})", "warning"))
    return out


def coverage_violations(train: list[Located], minimum: int, modules: tuple[str, ...], file: str) -> list[Violation]:
    counts = Counter(x.example["module"] for x in train)
    return [Violation("coverage.module", file, None, f"module {m!r} has {counts.get(m, 0)} training examples, fewer than {minimum}")
            for m in modules if counts.get(m, 0) < minimum]


def length_violations(examples: list[Located], tokenizer, max_seq_len: int) -> list[Violation]:
    """Every formatted example must fit max_seq_len base-model tokens; says how many would be cut."""
    out = []
    for x in examples:
        text = tokenizer.apply_chat_template(x.example["messages"], tokenize=False)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])  # as training encodes it
        if n > max_seq_len:
            out.append(Violation("length.tokens", x.file, x.line,
                                 f"{x.example['id']}: {n} tokens after chat formatting, over max_seq_len {max_seq_len} "
                                 f"({n - max_seq_len} would be truncated)"))
    return out
