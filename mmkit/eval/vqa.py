"""VQAv2 accuracy: answer normalisation and the "min(#humans that said it / 3, 1)" metric.

    vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7)       # 0.9: 3 of 10 humans agree, averaged leave-one-out
    vqa_score({1: "yes"}, {1: ["yes"] * 10}, types={1: "is the"})
    # {"overall": 1.0, "num_questions": 1, "per_type": {"is the": 1.0}}

Accuracies are fractions in [0, 1] (the official script prints percentages).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

from .captioning import _check_same_keys

__all__ = ["normalize_answer", "vqa_accuracy", "vqa_score"]

# Punctuation the VQA evaluation deletes (when it touches a space or the answer contains a
# digit-comma-digit number) or else turns into a space ("black/white" -> "black white").
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_THOUSANDS_COMMA = re.compile(r"\d,\d")
# A period is deleted unless a digit follows it ("3.5" survives, "yes." does not).
_PERIOD = re.compile(r"\.(?!\d)")
_ARTICLES = frozenset({"a", "an", "the"})
# Number words the VQA evaluation maps to digits (it stops at ten; "none" counts as 0).
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
# Contractions typed without their apostrophe, restored so "dont" matches "don't". A subset of the
# official list: the negations and pronoun/wh-word contractions that occur in VQA answers. Words
# that are also plain English ("its", "were", "well", "hell", "shell", "wed", "id") are left alone.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "isnt": "isn't", "mightnt": "mightn't", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "shant": "shan't",
    "shouldnt": "shouldn't", "shouldve": "should've", "wasnt": "wasn't", "werent": "weren't",
    "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've",
    "im": "i'm", "ive": "i've", "youre": "you're", "youve": "you've", "youll": "you'll", "youd": "you'd",
    "hes": "he's", "shes": "she's", "itll": "it'll", "itd": "it'd", "theyre": "they're",
    "theyve": "they've", "theyll": "they'll", "theyd": "they'd", "weve": "we've", "lets": "let's",
    "thats": "that's", "theres": "there's", "whats": "what's", "wheres": "where's", "whos": "who's",
    "whys": "why's", "hows": "how's", "whens": "when's", "whatre": "what're", "whove": "who've", "somebodys": "somebody's", "someones": "someone's", "somethings": "something's",
    "nobodys": "nobody's", "yall": "y'all", "maam": "ma'am", "oclock": "o'clock",
}  # fmt: skip


def normalize_answer(text: str) -> str:
    """Normalise a VQA answer the way the VQAv2 evaluation script does.

    Steps, in order:

    1. newlines and tabs become spaces; surrounding whitespace is stripped;
    2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted if it is next to a space
       or the answer holds a number like "1,000", and otherwise replaced by a space
       ("black/white" -> "black white", "1,000" -> "1000", "yes, it is" -> "yes it is");
    3. a period not followed by a digit is deleted ("yes." -> "yes", "3.5" stays);
    4. lower-case, split on whitespace, number words zero..ten (and "none") become digits
       ("two" -> "2"), articles a / an / the are dropped, and apostrophe-less contractions are
       repaired ("dont" -> "don't", a subset of the official list, see ``_CONTRACTIONS``).

    Apostrophes and colons are kept, as in the official script.

    Example: ``normalize_answer("The Two dogs.") -> "2 dogs"``.
    """
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a str, got {type(text).__name__}: {text!r:.80}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # The official script decides for each mark by looking at the answer before any replacement.
    original = text
    delete_all = _THOUSANDS_COMMA.search(original) is not None
    for mark in _PUNCTUATION:
        if delete_all or (mark + " ") in original or (" " + mark) in original:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one predicted answer against the human answers, in [0, 1].

    Args:
        prediction: the model's answer.
        answers: the human answers (10 per question in VQAv2; repeats are meaningful).

    Both sides go through :func:`normalize_answer`. With m human answers equal to the prediction:

    - 10 or more answers: the mean, over the subsets that leave one human out, of
      ``min(matches in the subset / 3, 1)``; with 10 answers, m = 3 gives 0.9, m = 2 gives 0.6,
      m = 1 gives 0.3, m >= 4 gives 1.0.
    - 2 to 9 answers: ``min(m / 3, 1)``.
    - one answer (ShapesWorld, clips and other sources with one exact answer): exact match, 1.0 or 0.0. (The
      VQAv2 formula would cap a right answer at 1/3 there; mmkit did so before 2026-11-30, so VQA numbers of
      single-answer sources written earlier are a third of the exact-match accuracy.)
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(
            f"answers must be a non-empty list of human answer strs, got {answers!r:.80}; "
            "wrap a single answer as [answer]"
        )
    target = normalize_answer(prediction)
    num = len(answers)
    matches = sum(normalize_answer(a) == target for a in answers)
    if num == 1:
        return float(matches)
    if num < 10:
        return min(matches / 3.0, 1.0)
    # Leaving out one of the m matching answers leaves m - 1 matches; leaving out any other, m.
    left_out_match = min((matches - 1) / 3.0, 1.0) if matches else 0.0
    left_out_other = min(matches / 3.0, 1.0)
    return (matches * left_out_match + (num - matches) * left_out_other) / num


def vqa_score(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    *,
    types: Mapping[Hashable, str] | None = None,
) -> dict:
    """VQAv2 accuracy over a set of questions, overall and per question type.

    Args:
        predictions: ``{question_id: predicted answer}``.
        answers: ``{question_id: [human answers]}``, exactly the keys of ``predictions``.
        types: optional ``{question_id: question type}`` (e.g. VQAv2's ``question_type`` "what color
            is the", or its ``answer_type`` "yes/no" / "number" / "other") covering every question.

    Returns:
        ``{"overall": float, "num_questions": int}`` plus, when ``types`` is given,
        ``"per_type": {type: float}`` (mean over the questions of each type, types sorted by name).
        Accuracies are fractions in [0, 1]; see :func:`vqa_accuracy`.
    """
    _check_same_keys(predictions, answers, "predictions", "answers")
    if not predictions:
        raise ValueError("predictions and answers are empty; give at least one question")
    if types is not None:
        missing = [qid for qid in predictions if qid not in types]
        if missing:
            shown = ", ".join(repr(q) for q in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"types has no question type for {len(missing)} question id(s): {shown}; "
                "give a type for every question in predictions, or pass types=None"
            )

    accuracy = {qid: vqa_accuracy(pred, answers[qid]) for qid, pred in predictions.items()}
    result: dict = {"overall": sum(accuracy.values()) / len(accuracy), "num_questions": len(accuracy)}
    if types is not None:
        by_type: dict[str, list[float]] = {}
        for qid, acc in accuracy.items():
            by_type.setdefault(types[qid], []).append(acc)
        result["per_type"] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
    return result
