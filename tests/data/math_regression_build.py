"""Writes ``math_regression.txt``: answer-equivalence cases built from templates with seeded random values.

Run ``python tests/data/math_regression_build.py`` to rebuild the file (the output is deterministic). Every
template states its verdict by construction: equal forms of one value, or a wrong value dressed to look right
(a neighbour, a sign, a shifted decimal, a list read as a number, an intermediate result, a second letter).
Categories: int, decimal, frac, grouping, boxes, prose, lang, choice, lhs, roots, expr, sets, units, trap, words,
sci, percent, money, mixed, matrix, eq, ineq.
"""

from __future__ import annotations

import random
from fractions import Fraction
from math import gcd
from pathlib import Path

OUT = Path(__file__).with_name("math_regression.txt")
Case = tuple[bool, str, str, str]

WRAPS = [
    "{}", "\\boxed{{{}}}", "The answer is {}.", "Final answer: {}", "So the result is ${}$.", "$\\boxed{{{}}}$",
    "**Final Answer:** {}", "#### {}", "<answer>{}</answer>", "Thus we obtain $x = {}$.", "\\[ {} \\]",
    "After simplifying, the final answer is $\\boxed{{{}}}$. I hope it is correct.", "Answer: {}",
]
PHRASES = [
    "La respuesta es {}.", "La respuesta final es ${}$.", "Die Antwort ist {}.", "Die endgültige Antwort lautet {}.",
    "La réponse est {}.", "La réponse finale est $\\boxed{{{}}}$.", "A resposta é {}.", "Resposta: {}",
    "La risposta è {}.", "Ответ: {}", "Окончательный ответ: ${}$", "答案是 {}。", "最终答案：${}$", "答え: {}",
]


def _grouped(n: int, sep: str) -> str:
    return f"{n:,}".replace(",", sep)


def ints(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(70):
        n = rng.choice([rng.randint(0, 99), rng.randint(100, 999), -rng.randint(1, 500)])
        wrap = rng.choice(WRAPS)
        cases.append((True, "int", str(n), wrap.format(n)))
        cases.append((True, "int", str(n), rng.choice([f"{n}.0", f"{n}.00", f"+{n}" if n > 0 else f"{n}", f"{{{n}}}"])))
        wrong = rng.choice([w for w in (n + 1, n - 1, -n, n * 10, int(str(abs(n))[::-1])) if w != n])
        cases.append((False, "int", str(n), wrap.format(wrong)))
    return cases


def decimals(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(45):
        value = Fraction(rng.randint(1, 999), rng.choice([4, 8, 20, 25, 50]))
        text = f"{float(value):g}"
        if "." not in text:
            continue
        cases.append((True, "decimal", text, rng.choice(WRAPS).format(f"\\frac{{{value.numerator}}}{{{value.denominator}}}")))
        cases.append((True, "decimal", text, f"{text}0"))
        cases.append((True, "decimal", f"{value.numerator}/{value.denominator}", text))
        shifted = text.replace(".", "")[:-1] + "." + text.replace(".", "")[-1]  # the point one place off
        cases.append((False, "decimal", text, shifted if shifted.lstrip("0.") != text.lstrip("0.") else text + "1"))
        cases.append((False, "decimal", text, f"{float(value) + 0.01:.2f}"))
    return cases


def fractions(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(45):
        a, b = rng.randint(1, 30), rng.randint(2, 31)
        if gcd(a, b) != 1:
            continue
        k = rng.randint(2, 5)
        gold = f"\\frac{{{a}}}{{{b}}}"
        cases.append((True, "frac", gold, rng.choice([f"\\dfrac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\frac{{{a * k}}}{{{b * k}}}",
                                                    f"\\tfrac{{{a}}}{{{b}}}", f"{a}/{b}".replace("/", " / ")])))
        cases.append((True, "frac", f"-{gold}", rng.choice([f"\\frac{{-{a}}}{{{b}}}", f"-{a}/{b}", f"\\frac{{{a}}}{{-{b}}}"])))
        rounded = f"{float(Fraction(a, b)):.2f}"
        wrong = [f"\\frac{{{b}}}{{{a}}}", f"\\frac{{{a + 1}}}{{{b}}}", f"-{gold}", f"\\frac{{{a}}}{{{b + 1}}}"]
        wrong += [rounded] if Fraction(rounded) != Fraction(a, b) else []
        cases.append((False, "frac", gold, rng.choice(wrong)))
    return cases


def grouping(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(40):
        n = rng.randint(1000, 9_999_999)
        head, tail = divmod(n, 1000)
        cases.append((True, "grouping", str(n), rng.choice([_grouped(n, ","), _grouped(n, " "), _grouped(n, "{,}"),
                                                           _grouped(n, "\\,"), f"\\boxed{{{_grouped(n, ',')}}}"])))
        cases.append((True, "grouping", _grouped(n, ","), str(n)))
        cases.append((False, "grouping", str(n), f"{head}, {tail:03d}"))  # a pair, never one number
        cases.append((False, "grouping", f"({head}, {tail:03d})", _grouped(n, ",")))
        cases.append((False, "grouping", f"{head}, {tail:03d}", str(n)))
        whole, cents = rng.randint(1, 999), rng.randint(1, 99)
        decimal = f"{whole}.{cents:02d}".rstrip("0")
        cases.append((True, "grouping", decimal, f"{whole},{cents:02d}".rstrip("0")))  # a decimal comma
        cases.append((False, "grouping", decimal, f"{whole}, {cents:02d}"))
        cases.append((False, "grouping", str(whole), f"{whole},{rng.randint(100, 999)}"))
    return cases


def boxes(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(40):
        a, b, c = rng.sample(range(-20, 30), 3)
        gap = rng.choice([", ", " and ", "$ or $x = ", " \\quad ", "", " \\text{ and } "])
        two = f"$x = \\boxed{{{a}}}{gap}\\boxed{{{b}}}$"
        cases.append((True, "boxes", f"{a}, {b}", two))
        cases.append((True, "boxes", f"{b}, {a}", two))  # the roots, in either order
        cases.append((False, "boxes", f"{a}, {c}", two))
        cases.append((False, "boxes", f"{a}", two))
        late = f"Trying $\\boxed{{{a}}}$ first.\n\nThat fails, so we continue.\n\nTherefore the final answer is {b}."
        cases.append((True, "boxes", str(b), late))
        cases.append((False, "boxes", str(a), late))
    return cases


def prose(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(40):
        n, m = rng.sample(range(2, 500), 2)
        x = f"{rng.randint(-9, 9)}.{rng.randint(1, 9)}"
        cases.append((True, "prose", str(n), f"Adding the two groups gives {m - 1} plus {n - m + 1}, which is {n}."))
        cases.append((True, "prose", x, rng.choice(["Final answer: {}", "Final Answer: ${}$", "final answer = {}"]).format(x)))
        cases.append((False, "prose", x, f"Final answer: {x}5"))
        cases.append((False, "prose", str(m), f"The answer is {n}. {m} apples remain in the basket."))
        cases.append((True, "prose", str(n), f"We first find {m}. The final answer is {n}. Indeed {n} works."))
        cases.append((False, "prose", str(m), f"We first find {m}. The final answer is {n}. Indeed {n} works."))
    return cases


def languages(rng: random.Random) -> list[Case]:
    cases = []
    for phrase in PHRASES:
        for _ in range(5):
            k, d = rng.randint(2, 300), rng.randint(2, 9)
            n, wrong = rng.choice([(str(k), str(k + 1)), (f"\\frac{{1}}{{{d}}}", f"\\frac{{1}}{{{d + 1}}}"),
                                   (f"{d}\\sqrt{{2}}", f"{d}\\sqrt{{3}}")])
            cases.append((True, "lang", n, phrase.format(n)))
            cases.append((False, "lang", n, phrase.format(wrong)))
    return cases


CHOICE_RIGHT = [
    "{L}", "({L})", "\\boxed{{{L}}}", "\\boxed{{\\text{{({L})}}}}", "The answer is ({L}).", "The correct option is {L}.",
    "Answer: {L}", "After checking each option, the answer is **{L}**.", "\\textbf{{({L})}}", "{l}", "({L}) {v}",
    "The answer is $\\boxed{{{L}}}$", "Option {L} is correct, so the answer is {L}.", "答案是{L}",
]
CHOICE_WRONG = [
    "{O}", "({O})", "\\boxed{{{O}}}", "The answer is ({O}).", "Answer: {O}", "{L} or {O}", "({O}) {v}",
    "A quick check rules out {L}; the answer is {O}.", "The correct option is {O}.",
]


def choices(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(12):
        for template in CHOICE_RIGHT:
            letter = rng.choice("ABCDE")
            gold = rng.choice([letter, f"({letter})", f"\\text{{({letter})}}"])
            cases.append((True, "choice", gold, template.format(L=letter, l=letter.lower(), v=rng.randint(2, 99))))
        for template in CHOICE_WRONG:
            letter, other = rng.sample("ABCDE", 2)
            cases.append((False, "choice", letter, template.format(L=letter, O=other, v=rng.randint(2, 99))))
    return cases


def lhs(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(25):
        a, b, k = rng.randint(2, 9), rng.randint(1, 9), rng.randint(1, 3)
        line = f"{a}x + {b}"
        cases.append((True, "lhs", f"y = {line}", line))
        cases.append((True, "lhs", line, f"y = {line}"))
        cases.append((False, "lhs", f"y = {line}", f"y = {a}x + {b + 1}"))
        cases.append((False, "lhs", f"\\sum_{{k={k}}}^{{n}} (k^2 + {b})", f"\\sum_{{k={k + 1}}}^{{n}} (k^2 + {b})"))
        cases.append((False, "lhs", f"\\sum_{{i={k}}}^{{{a + 5}}} i", f"\\sum_{{i={k + 1}}}^{{{a + 5}}} i"))
        cases.append((True, "lhs", f"\\sum_{{i=1}}^{{{a}}} i", str(a * (a + 1) // 2)))
    return cases


def roots(rng: random.Random) -> list[Case]:
    cases = []
    for k in range(2, 10):
        cube = k**3
        cases.append((True, "roots", str(k), f"\\sqrt[3]{{{cube}}}"))
        cases.append((False, "roots", str(k), f"\\sqrt{{{cube}}}"))
        cases.append((True, "roots", f"\\sqrt{{{k}}}", f"\\sqrt{k}"))
        cases.append((True, "roots", f"\\sqrt[3]{{{k}}}", f"\\sqrt[3]{k}"))
        cases.append((False, "roots", f"\\sqrt{{{k}}}", f"\\sqrt[3]{k}"))
        cases.append((True, "roots", f"{k}\\sqrt{{2}}", f"\\sqrt{{{2 * k * k}}}"))
        cases.append((False, "roots", f"{k}\\sqrt{{2}}", f"\\sqrt{{{2 * k * k + 1}}}"))
        cases.append((True, "roots", "2", "\\sqrt[3]8"))
    return cases


def expressions(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(30):
        p, q = rng.sample([v for v in range(-7, 8) if v], 2)
        expanded = f"x^2 {-(p + q):+d}x {p * q:+d}".replace("+0x", "").replace("+-", "-")
        cases.append((True, "expr", f"(x {-p:+d})(x {-q:+d})", expanded))
        cases.append((False, "expr", f"(x {-p:+d})(x {-q:+d})", f"(x {p:+d})(x {-q:+d})"))
        c = rng.randint(2, 9)
        cases.append((True, "expr", f"{c}\\pi", f"\\pi \\cdot {c}"))
        cases.append((False, "expr", f"{c}\\pi", str(c)))
        cases.append((True, "expr", f"\\frac{{\\sqrt{{3}}}}{{{c}}}", f"\\frac{{1}}{{{c}}}\\sqrt{{3}}"))
    return cases


def sets(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(25):
        a, b = sorted(rng.sample(range(-9, 12), 2))
        cases.append((True, "sets", f"[{a}, {b})", f"[{a},{b})"))
        cases.append((False, "sets", f"[{a}, {b})", f"[{a}, {b}]"))
        cases.append((False, "sets", f"({a}, {b})", f"({b}, {a})"))
        cases.append((True, "sets", f"\\{{{a}, {b}\\}}", f"\\{{{b}, {a}\\}}"))
        cases.append((True, "sets", f"(-\\infty, {a}]", f"(-\\infty,{a}]"))
    return cases


def units(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(25):
        n = rng.randint(2, 400)
        cases.append((True, "units", str(n), rng.choice([f"\\${n}", f"{n}\\%", f"{n}^\\circ", f"{n} \\text{{ cm}}", f"{n} dollars"])))
        cases.append((False, "units", str(n), rng.choice([f"\\${n + 1}", f"{n + 10}\\%", f"{n - 1}^\\circ", f"{n}.5 \\text{{ cm}}"])))
    return cases


def traps(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(25):
        n = rng.randint(2, 60)
        cases.append((False, "trap", str(n), rng.choice([f"{n}^2", f"{n}.5", f"0.{n}", f"{n}0", f"-{n}", f"\\frac{{1}}{{{n}}}"])))
        cases.append((False, "trap", str(n), f"The answer is not {n + 1} but {n + 2}."))
        cases.append((False, "trap", f"\\frac{{{n}}}{{{n + 1}}}", f"\\frac{{{n + 1}}}{{{n}}}"))
    return cases


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def words(rng: random.Random) -> list[Case]:
    cases = []
    for day in DAYS:
        other = rng.choice([d for d in DAYS if d != day])
        cases += [(True, "words", f"\\text{{{day}}}", day), (True, "words", day, f"So the meeting falls on a {day}. The answer is {day}.")]
        cases += [(False, "words", f"\\text{{{day}}}", other), (False, "words", day, f"It is {other}, not {day}... no: {other}.")]
    for yes, no in (("yes", "no"), ("even", "odd"), ("true", "false")):
        cases += [(True, "words", f"\\text{{{yes}}}", yes.capitalize()), (False, "words", yes, no)]
    return cases


def notation(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(20):
        mantissa, power = f"{rng.randint(1, 9)}.{rng.randint(10, 99)}", rng.randint(3, 25)
        cases.append((True, "sci", f"{mantissa} \\times 10^{{{power}}}", f"{mantissa}e{power}"))
        cases.append((False, "sci", f"{mantissa} \\times 10^{{{power}}}", f"{mantissa}e{power - 1}"))
        pct = rng.randint(1, 99)
        cases.append((True, "percent", f"{pct}\\%", f"{pct / 100:g}"))
        cases.append((False, "percent", f"{pct}\\%", f"{pct / 1000:g}"))
        dollars = rng.randint(1000, 99999) + rng.randint(1, 99) / 100
        cases.append((True, "money", f"\\${dollars:,.2f}", f"{dollars:.2f}".rstrip("0")))
        cases.append((False, "money", f"\\${dollars:,.2f}", f"{dollars + 0.1:.2f}"))
        whole, num, den = rng.randint(1, 9), rng.randint(1, 3), 4
        cases.append((True, "mixed", f"{whole}\\frac{{{num}}}{{{den}}}", f"{whole + num / den:g}"))
        cases.append((False, "mixed", f"{whole}\\frac{{{num}}}{{{den}}}", f"{whole * num / den:g}"))
    return cases


def structures(rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(12):
        a, b, c, d = (rng.randint(-9, 9) for _ in range(4))
        matrix = f"\\begin{{pmatrix}} {a} & {b} \\\\ {c} & {d} \\end{{pmatrix}}"
        cases.append((True, "matrix", matrix, f"\\begin{{bmatrix}}{a}&{b}\\\\{c}&{d}\\end{{bmatrix}}"))
        cases.append((False, "matrix", matrix, f"\\begin{{pmatrix}} {a} & {c} \\\\ {b} & {d + 1} \\end{{pmatrix}}"))
        k, m = rng.randint(2, 9), rng.randint(1, 9)
        cases.append((True, "eq", f"y = {k}x + {m}", f"y - {k}x = {m}"))
        cases.append((False, "eq", f"y = {k}x + {m}", f"y = {m}x + {k}" if k != m else f"y = {k}x - {m}"))
        cases.append((True, "ineq", f"(-\\infty, {m})", f"x < {m}"))
        cases.append((False, "ineq", f"(-\\infty, {m})", f"x \\le {m}"))
    return cases


def build(seed: int = 2026) -> list[Case]:
    rng = random.Random(seed)
    makers = (ints, decimals, fractions, grouping, boxes, prose, languages, choices, lhs, roots, expressions, sets,
              units, traps, words, notation, structures)
    cases = [case for make in makers for case in make(rng)]
    return list(dict.fromkeys(cases))


def main() -> None:
    lines = [
        "# Answer-equivalence regression cases for agentrl.rewards.math.verify, built by math_regression_build.py.",
        "# Format as in math_equivalence.txt: <+|-> <category> <gold> ⇔ <pred>; ⏎ is a newline.",
    ]
    for equal, category, gold, pred in build():
        lines.append(f"{'+' if equal else '-'} {category} {gold.replace(chr(10), '⏎')} ⇔ {pred.replace(chr(10), '⏎')}")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines) - 2} cases to {OUT}")


if __name__ == "__main__":
    main()
