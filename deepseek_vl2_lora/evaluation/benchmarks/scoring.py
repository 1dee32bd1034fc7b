"""Scoring rules of the published numbers: VLMEvalKit's (and the official VQA / ST-VQA / ChartQA ones they follow).

vqa_accuracy      VQA accuracy: the answer and every reference normalised as the official VQA evaluation does
                  (lower case, punctuation, number words to digits, articles dropped, contractions); the score
                  averages min(#matches among the other references / 3, 1) over the references left out one at
                  a time (the official 10-choose-9 subset average; with 10 references 1, 2, 3 matches give
                  0.3, 0.6, 0.9 and 4 or more 1.0). VLMEvalKit normalises always; the official script only when
                  the references disagree.
anls              ANLS: per reference 1 - normalized Levenshtein distance (lower case, spaces collapsed), 0 when
                  that similarity is below 0.5; the best reference counts.
relaxed_accuracy  ChartQA: a number within 5 % of the reference (relative to the reference; "12%" is 0.12),
                  otherwise exact match ignoring case; the best reference counts.
extract_choice    multiple choice: the option letter standing alone in the reply ("B", "(B)", "B.", "Answer: B"),
                  else the one option whose text the reply contains; None when neither finds exactly one
                  (VLMEvalKit's can_infer; counted as unparseable and wrong: no LLM judge here).
extract_yes_no    "yes" or "no" when the reply holds exactly one of the two words.
ocrbench_match    OCRBench: a reference occurs in the reply (lower case).
"""

from __future__ import annotations

import re

# The official VQA evaluation's tables (vqaEval.py), as VLMEvalKit copies them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern, typo included: "(?!<=\d)" is a lookahead that always holds, so every period not followed by
# a digit goes ("3.5" keeps its point, "dogs." loses it). The official call passes re.UNICODE as the count (32).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
CHOICE_PUNCTUATION = ".()[],:;!*#{}"


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # Next to a space (or anywhere in a number like 1,000) a mark is dropped; inside a word it splits it.
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa(text: str) -> str:
    """The official VQA answer normalisation (VLMEvalKit's process_answer)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """Mean over the references of min(#other references equal to the answer / 3, 1), after normalisation."""
    refs = [normalize_vqa(r) for r in references]
    pred = normalize_vqa(prediction)
    if len(refs) == 1:  # one reference (a VLMEvalKit VQA file without the 10): plain match
        return float(refs[0] == pred)
    scores = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Max over references of 1 - NLD (0 when below `threshold`); NLD = edit distance / the longer length."""
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ref in references:
        gt = " ".join(ref.strip().lower().split())
        length = max(len(gt), len(pred))
        similarity = 1.0 - (levenshtein(gt, pred) / length if length else 0.0)
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: list[str], tolerance: float = RELAXED_TOLERANCE) -> float:
    """1.0 if some reference is met: numerically within `tolerance` relative error, else as text ignoring case."""
    pred = prediction.strip()
    for ref in references:
        ref = ref.strip()
        p, r = _to_float(pred), _to_float(ref)
        if p is not None and r:  # a zero reference has no relative error: exact match (as pix2struct)
            if abs(p - r) / abs(r) <= tolerance:
                return 1.0
        elif pred.lower() == ref.lower():
            return 1.0
    return 0.0


def extract_choice(reply: str, options: dict[str, str]) -> str | None:
    """The option letter the reply gives, or None (see the module docstring)."""
    text = reply
    for c in CHOICE_PUNCTUATION:
        text = text.replace(c, " ")
    tokens = text.split()
    letters = [letter for letter in options if letter in tokens]
    if len(letters) == 1:
        return letters[0]
    low = reply.lower()
    matches = [letter for letter, option in options.items() if str(option).lower() in low]
    return matches[0] if len(matches) == 1 else None


def extract_yes_no(reply: str) -> str | None:
    words = _process_punctuation(reply.lower()).split()
    if ("yes" in words) != ("no" in words):
        return "yes" if "yes" in words else "no"
    return None


def ocrbench_match(prediction: str, references: list[str]) -> float:
    pred = prediction.lower().strip().replace("\n", " ")
    return float(any(r.lower().strip().replace("\n", " ") in pred for r in references))


def score_open(task: str, reply: str, references: list[str]) -> tuple[float, str | None]:
    """(score in [0, 1], the parsed answer: None when it could not be parsed) of an open question's reply."""
    if task == "vqa":
        return vqa_accuracy(reply, references), reply.strip()
    if task == "anls":
        return anls(reply, references), reply.strip()
    if task == "relaxed":
        return relaxed_accuracy(reply, references), reply.strip()
    if task == "ocrbench":
        return ocrbench_match(reply, references), reply.strip()
    if task == "yesno":
        parsed = extract_yes_no(reply)
        return float(parsed is not None and parsed in {r.strip().lower() for r in references}), parsed
    raise ValueError(f"unknown open task {task!r}")
