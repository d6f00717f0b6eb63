"""ERP keyword coverage as a local `evaluate` module (loaded by path; offline).

Per example: the share of the reference answer's key terms that the answer contains.

Key terms of a reference (text compared after NFKC and casefold):
1. the ERP glossary terms it contains (evaluation/erp_terms.txt: modules, menus, document types,
   codes, in Korean and English), taken leftmost-longest and without overlaps, so
   "재무관리 > 전표 > 전표입력" gives {재무관리, 전표, 전표입력} and "전표입력" alone gives {전표입력};
2. when no glossary term occurs, its content words instead: Hangul words of at least two syllables
   once one common trailing particle or 하다/되다/이다 ending is stripped (전표를 -> 전표,
   확인하세요 -> 확인; a one-syllable particle only when two syllables remain, so 평가 stays), and
   Latin words of at least four letters outside a small stopword list;
3. when it has no content words either, all of its word tokens.

A key term is present in the answer when it occurs there case-insensitively after NFKC: Hangul as a
substring with spacing ignored (agglutination puts particles right after the term: "전표를" contains
"전표"); a Latin or digit end of a term must start or end a word, so "PO" is not found in "report"
(a glossary term may take a plural -s/-es; a content word any suffix: approve -> approved).

Score = present / key terms. A reference without any word (empty, or punctuation only) scores 1.0;
any other reference has key terms by rule 3, so an empty answer scores 0.0 against it. The mean is the
unweighted mean over examples.
"""

import re
import unicodedata
from pathlib import Path

import datasets
import evaluate

HANGUL = "\uac00-\ud7a3"
_LATIN_EDGE = "0-9a-z_"

PARTICLES_AND_ENDINGS = sorted(
    ["은", "는", "이", "가", "을", "를", "에", "에서", "에서는", "으로", "로", "의", "와", "과", "도", "만",
     "까지", "부터", "에게", "보다", "처럼",
     "합니다", "하세요", "하십시오", "해야", "하면", "하고", "하여", "해서", "하는", "하며", "할", "한",
     "됩니다", "되며", "되면", "되어", "되고", "되는", "된", "입니다", "이며", "이고"],
    key=len, reverse=True)
"""Trailing particles and common predicate endings, longest first (one is stripped per word)."""

KOREAN_STOPWORDS = frozenset(
    "있습니다 없습니다 있으면 있는 없는 있고 없고 경우 그리고 또는 하지만 해당 위해 통해 대한 다음 먼저 다시 함께 "
    "바로 모두 이미 아직 반드시 그럼 그러면 않습니다 않고 않은 않으면 것을 것은 것이 때문에".split())
ENGLISH_STOPWORDS = frozenset(
    "about after again also because been before being between both cannot could does doing done down during each "
    "either even every first from have having here into just like make many more most much must need needs never "
    "next once only other over same should since some such than that their them then there these they this those "
    "through under until upon very want were what when where which while will with within would your yours".split())


def default_glossary_path() -> Path:
    """evaluation/erp_terms.txt (this file runs from evaluate's module cache, so it is found via the package)."""
    import evaluation

    return Path(evaluation.__file__).parent / "erp_terms.txt"


def read_glossary(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def term_pattern(term: str, suffix: str) -> re.Pattern:
    """Regex for a folded term: optional spaces inside Hangul, word edges at Latin/digit ends, then `suffix`."""
    parts = []
    words = term.split()
    for w, word in enumerate(words):
        if w:
            parts.append(r"\s*" if re.search(f"[{HANGUL}]", word + words[w - 1]) else r"\s+")
        for c, ch in enumerate(word):
            if c and re.match(f"[{HANGUL}]", ch) and re.match(f"[{HANGUL}]", word[c - 1]):
                parts.append(r"\s?")
            parts.append(re.escape(ch))
    left = f"(?<![{_LATIN_EDGE}])" if re.match(f"[{_LATIN_EDGE}]", term) else ""
    right = suffix if re.search(f"[{_LATIN_EDGE}]$", term) else ""
    return re.compile(left + "".join(parts) + right)


def glossary_patterns(terms: list[str]) -> list[tuple[str, re.Pattern]]:
    """(folded term, pattern) for whole-term matching with an optional plural."""
    folded = list(dict.fromkeys(fold(t) for t in terms))
    return [(t, term_pattern(t, f"(?:e?s)?(?![{_LATIN_EDGE}])")) for t in folded]


def glossary_terms(reference: str, patterns: list[tuple[str, re.Pattern]]) -> list[str]:
    """Glossary terms in the reference, leftmost-longest without overlaps, in order of first occurrence."""
    text = fold(reference)
    spans = sorted(((m.start(), -(m.end() - m.start()), term) for term, p in patterns for m in p.finditer(text)))
    chosen, end = [], -1
    for start, neg_len, term in spans:
        if start >= end:
            chosen.append(term)
            end = start - neg_len
    return list(dict.fromkeys(chosen))


def strip_suffix(word: str) -> str:
    """A Hangul word without its longest trailing particle or ending. A one-syllable suffix goes only when
    two syllables remain (평가 keeps its 가); a longer one whenever anything remains (년입니다 -> 년)."""
    for suffix in PARTICLES_AND_ENDINGS:
        rest = len(word) - len(suffix)
        if word.endswith(suffix) and rest >= (2 if len(suffix) == 1 else 1):
            return word[:rest]
    return word


def content_words(reference: str) -> list[str]:
    """Hangul words (>= 2 syllables, suffix stripped) and Latin words (>= 4 letters, not stopwords)."""
    text = fold(reference)
    words = []
    for token in re.findall(f"[{HANGUL}]+|[a-z]+", text):
        if re.match(f"[{HANGUL}]", token):
            word = strip_suffix(token)
            if len(word) >= 2 and word not in KOREAN_STOPWORDS and word not in PARTICLES_AND_ENDINGS:
                words.append(word)
        elif len(token) >= 4 and token not in ENGLISH_STOPWORDS:
            words.append(token)
    return list(dict.fromkeys(words))


def key_terms(reference: str, patterns: list[tuple[str, re.Pattern]]) -> tuple[list[str], bool]:
    """(terms, from_glossary): glossary terms, else content words, else every word token (module docstring)."""
    terms = glossary_terms(reference, patterns)
    if terms:
        return terms, True
    return content_words(reference) or list(dict.fromkeys(re.findall(r"\w+", fold(reference)))), False


def present(term: str, answer: str, glossary: bool) -> bool:
    """Whether a folded key term occurs in the answer (a glossary term whole, a content word as a word start)."""
    suffix = f"(?:e?s)?(?![{_LATIN_EDGE}])" if glossary else ""
    return term_pattern(term, suffix).search(fold(answer)) is not None


def coverage(answer: str, reference: str, patterns: list[tuple[str, re.Pattern]]) -> float:
    """Share of the reference's key terms present in the answer (1.0 for a reference without words)."""
    terms, from_glossary = key_terms(reference, patterns)
    if not terms:
        return 1.0
    return sum(present(t, answer, from_glossary) for t in terms) / len(terms)


class KeywordCoverage(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of the reference answer's key ERP terms (glossary terms, else content words) "
                        "found in the answer.",
            citation="",
            inputs_description="predictions: list of str; references: list of str; "
                               "glossary: optional list of terms (default evaluation/erp_terms.txt)",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, glossary=None):
        patterns = glossary_patterns(glossary if glossary is not None else read_glossary(default_glossary_path()))
        scores = [coverage(p, r, patterns) for p, r in zip(predictions, references)]
        return {"keyword_coverage": sum(scores) / max(1, len(scores)), "keyword_coverage_per_example": scores}
