"""Finding the final answer in a whole solution, and the chosen letter of a multiple-choice answer.

Pure string functions (no sympy). The rules, in order of trust:

1. an explicit marker, whichever comes **last** in the text: a run of ``\\boxed{}`` (boxes separated only by
   "and", commas or ``x =`` join into one list answer), ``<answer>…</answer>``, ``#### N``, or a "final
   answer" phrase (in several languages): a solution that boxes an intermediate result and then says "The final
   answer is 9" answers 9;
2. a weaker "the answer is …" / "Answer: …" phrase, the last one;
3. a bare answer is itself (few words outside math);
4. the last math segment, else the last number of a prose solution.

A phrase's answer runs to the end of its sentence: a period followed by a space or the end of the text, a
newline, or a CJK full stop. A sentence-final period is never part of the answer.
"""

from __future__ import annotations

import re

from agentrl.rewards.answers import extract_answer_tag, extract_hashes

__all__ = ["boxed_runs", "chosen_letter", "final_answer", "is_prose"]

_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_WORD = re.compile(r"(?<![\\\w])[^\W\d_]{2,}")
_CHAT_JUNK = re.compile(r"<\|im_(?:start|end)\|>.*$|<\|endoftext\|>.*$", re.DOTALL)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*")

# "final answer" in the languages models answer in; then the weaker "the answer is".
_STRONG = (
    r"final\s+answer|respuesta\s+final|réponse\s+finale|endgültige\s+antwort|resposta\s+final|risposta\s+finale"
    r"|окончательный\s+ответ|最终答案|最終答案|最终的答案|最終的な答え|최종\s*답"
)
_WEAK = (
    r"the\s+answer|answer|la\s+respuesta|respuesta|la\s+réponse|réponse|die\s+antwort|antwort|a\s+resposta"
    r"|resposta|la\s+risposta|risposta|ответ|答案|答え|정답|jawaban|đáp\s+án|cevap|odpowiedź|antwoord|svar"
)
# A phrase counts only with a verb or a colon after it ("To answer this, ..." is no answer phrase).
_VERB = r"(?:\**\s*(?:(?:is|was|will\s+be|es|est|ist|é|è|lautet)(?![^\W\d_])|[是为為は:：=]))+"
_END = r"(?=\.(?:\s|$)|。|\n|$)"
_STRONG_PHRASE = re.compile(
    rf"(?:{_STRONG})(?:{_VERB}|\**[ \t]*\n)[\s*]*(?P<a>[^\n。]+?)\s*{_END}", re.IGNORECASE
)
_WEAK_PHRASE = re.compile(rf"(?<![A-Za-z])(?:{_WEAK}){_VERB}\s*(?P<a>[^\n。]+?)\s*{_END}", re.IGNORECASE)
# What may stand between two boxes of one answer: spaces, math delimiters, commas, "and"/"or", "x =".
_BOX_GAP = re.compile(
    r"^[\s$,;.]*(?:\\?\\text\{\s*(?:and|or|,)\s*\}|\\quad|\\qquad|and|or)?[\s$,;]*"
    r"(?:\\?\(?[A-Za-z](?:_\{?\w+\}?)?\s*=\s*)?\\?\(?$",
    re.IGNORECASE,
)


def _braced(text: str, start: int) -> int | None:
    """The index after the brace group opening at ``text[start] == "{"``; None when it is not closed."""
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char in "{}" and i > 0 and text[i - 1] == "\\":
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """Every complete ``\\boxed{…}`` / ``\\fbox{…}`` (or ``\\boxed 5``) as ``(start, end, content)``."""
    found = []
    for match in _BOX.finditer(text):
        i = match.end()
        if i < len(text) and text[i] == "{":
            end = _braced(text, i)
            if end is not None:
                found.append((match.start(), end, text[i + 1 : end - 1].strip()))
        elif match.end() > match.start() + 6 and i < len(text):  # "\boxed 5": one token after a space
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                found.append((match.start(), i + token.end(), token.group(0)))
    return [box for box in found if not any(o[0] < box[0] < o[1] for o in found)]  # nested boxes: the outer


def boxed_runs(text: str) -> list[tuple[int, str]]:
    """Each run of adjacent boxes as ``(start, answer)``: one box's content, or several joined by ", "."""
    runs: list[tuple[int, int, list[str]]] = []
    for start, end, content in _boxes(text):
        if runs and _BOX_GAP.match(text[runs[-1][1] : start]):
            runs[-1] = (runs[-1][0], end, [*runs[-1][2], content])
        else:
            runs.append((start, end, [content]))
    return [(start, ", ".join(parts)) for start, _, parts in runs]


def is_prose(text: str) -> bool:
    """True for text that reads as sentences rather than a bare answer (several words outside math)."""
    outside = _MATH_SEGMENT.sub(" ", text)
    outside = re.sub(r"\\(?:begin|end)\{\w+\*?\}(?:\{[lcr|]+\})?|\\text\w*\{[^{}]*\}|\\[A-Za-z]+", " ", outside)
    return len(_WORD.findall(outside)) >= 2 or bool(re.search(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]", outside))


def _phrase_answer(answer: str) -> str:
    """A phrase's answer, without emphasis, a trailing period, or a box around it."""
    answer = answer.strip().strip("*").strip()
    runs = boxed_runs(answer)
    if runs:
        return runs[-1][1]
    return answer.rstrip(".").strip().strip("*").strip()


def _markers(text: str) -> list[tuple[int, str]]:
    """Explicit final-answer markers as ``(position, answer)``."""
    markers = boxed_runs(text)
    for pattern in (re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE), re.compile(r"####\s*([^\n]+)")):
        markers += [(m.start(), m.group(1).strip()) for m in pattern.finditer(text)]
    markers += [(m.start(), _phrase_answer(m.group("a"))) for m in _STRONG_PHRASE.finditer(text)]
    return [(pos, answer) for pos, answer in markers if answer]


def final_answer(text: str) -> str:
    """The final answer inside ``text``, or ``text`` itself when it already is a bare answer."""
    text = _CHAT_JUNK.sub("", text).strip()
    markers = _markers(text)
    if markers:
        return max(markers, key=lambda marker: marker[0])[1]
    for extract in (extract_answer_tag, extract_hashes):  # an unclosed tag cannot be found above
        found = extract(text)
        if found:
            return found
    phrases = [_phrase_answer(m.group("a")) for m in _WEAK_PHRASE.finditer(text)]
    phrases = [p for p in phrases if p]
    if phrases and (is_prose(text) or re.match(rf"\W*(?:{_WEAK})", text, re.IGNORECASE)):
        return phrases[-1]
    if not is_prose(text):
        return text
    segments = [next(g for g in m.groups() if g is not None) for m in _MATH_SEGMENT.finditer(text)]
    if segments:
        return segments[-1].strip()
    # the last number, or the last tuple or interval of numbers ("The point is (1, 2).")
    numbers = re.findall(r"[(\[]\s*-?\d[\d.,\s/-]*[)\]]|-?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?", text)
    return numbers[-1].rstrip(",") if numbers else text


# ---- multiple choice ------------------------------------------------------------------------------------
_LETTER_ALONE = re.compile(
    r"^\W*(?:\\text\w*\{)?\W*(?:option|choice)?\s*\(?\s*([A-Ea-e])\s*\)?\W*\}?\W*$", re.IGNORECASE
)
_LETTER_LEAD = re.compile(r"^\s*\*{0,2}\(?([A-E])\)[\s.:]|^\s*\*{0,2}\(?([A-E])\)?[.:]\s")
_LETTER_NAMED = re.compile(
    r"(?:option|choice|answer\s+is|answer|choose|pick|select|is|答案是|答案|选|選|antwort|respuesta|réponse|ответ)"
    r"\s*(?:is\s*)?[:：]?\s*\**\s*\(?((?-i:[A-E]))\)?(?![A-Za-z])",
    re.IGNORECASE,
)
_LETTER_TOKEN = re.compile(r"(?<![A-Za-z\\])\(?([A-E])\)?(?![A-Za-z])")


def _letter_of(answer: str) -> str | None:
    """The letter a short answer names: ``C``, ``(c)``, ``\\text{(C)}``, ``C) 42``, ``Option C``."""
    answer = answer.strip().strip("*$").strip()
    match = _LETTER_ALONE.match(answer) or _LETTER_LEAD.match(answer + " ")
    if not match:
        return None
    return next(g for g in match.groups() if g).upper()


def chosen_letter(text: str, strict: bool = True) -> str | None:
    """The multiple-choice letter (A–E) a text chooses, or None when it names none or several.

    A box, an answer tag or an answer phrase is read first; then a text that is only a letter (``(C)``,
    ``C) 42``). Without ``strict`` (the explicit choice mode) the last sentence may name the letter in prose
    ("I pick C."), but only when it names exactly one.
    """
    text = _CHAT_JUNK.sub("", text).strip()
    markers = _markers(text)
    if markers:
        return _letter_of(max(markers, key=lambda marker: marker[0])[1])
    letter = _letter_of(text)
    if letter:
        return letter
    named = list(_LETTER_NAMED.finditer(text))
    if named and (not strict or re.search(r"answer|option|choice|答案|选", text, re.IGNORECASE)):
        # the named letter must be the last letter in the text: "Option C is wrong; B is right" names none
        last = named[-1]
        later = [m for m in _LETTER_TOKEN.finditer(text, last.end()) if m.group(1)]
        return last.group(1).upper() if not later else None
    if strict:
        return None
    sentences = [s for s in re.split(r"(?<=[.!?。])\s+|\n", text) if s.strip()]
    letters = {m.group(1) for m in _LETTER_TOKEN.finditer(sentences[-1])} if sentences else set()
    return letters.pop() if len(letters) == 1 else None
