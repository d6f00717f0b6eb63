"""Answer-language agreement as a local `evaluate` module (loaded by path; offline).

Per example 1.0 when the answer is in the question's language, else 0.0.

A text's language comes from data_contracts.rules.hangul_share (Hangul letters / (Hangul + Latin
letters)): Korean when the share is at least KO_MIN_HANGUL_SHARE = 0.3, else English. The threshold
sits below one half because Korean ERP text carries Latin codes and English screen names, and a Hangul
syllable holds as much as two or three Latin letters: "Z_FIN_JE_POST 권한을 신청하세요" (0.44) and
"Journal Entry 화면에서 저장하세요" (0.43) are Korean answers. In data/erp every Korean question and
answer has a share of at least 0.68 and every English one 0.0. Below 0.3 the Latin text dominates:
"Open 전표입력 and save." (0.27) is English, and so is "Finance > Journal > Journal Entry에서
입력하세요" (0.21), which gives a Korean user English menu names that the Korean manuals never use.

An answer without Hangul or Latin letters (empty, digits only) has no language and disagrees. A
question without letters has no language to agree with: any answer with letters agrees.
"""

import datasets
import evaluate

from data_contracts.rules import KO_MIN_HANGUL_SHARE  # noqa: F401 (documented above)
from data_contracts.rules import detect_language


def agreement(answer: str, question: str) -> float:
    answer_lang = detect_language(answer)
    if answer_lang is None:
        return 0.0
    question_lang = detect_language(question)
    return float(question_lang is None or question_lang == answer_lang)


class LanguageAgreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Whether the answer is in the question's language (ko/en by Hangul share).",
            citation="",
            inputs_description="predictions: list of str (answers); questions: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "questions": datasets.Value("string")}),
        )

    def _compute(self, predictions, questions):
        scores = [agreement(a, q) for a, q in zip(predictions, questions)]
        return {"language_agreement": sum(scores) / max(1, len(scores)), "language_agreement_per_example": scores}
