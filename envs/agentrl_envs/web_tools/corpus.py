"""The bundled corpus and questions, a small BM25 search over it, and answer scoring (exact match, token F1).

The pages describe a fictional island chain, so a model has to look answers up rather than remember them.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import re
import string
from dataclasses import dataclass
from importlib import resources

__all__ = ["Hop", "Page", "Question", "SearchIndex", "exact_match", "load_corpus", "load_questions", "normalize",
           "token_f1"]

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}
_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from how in is it its of on or the to was were what when where "
    "which who whom why with".split()
)


@dataclass(frozen=True)
class Page:
    """One page: ``slug`` makes its URL path ``/page/<slug>``."""

    slug: str
    title: str
    text: str

    @property
    def path(self) -> str:
        return f"/page/{self.slug}"


@dataclass(frozen=True)
class Hop:
    """One step of a reference solution: a search query and the page it leads to."""

    query: str
    page: str


@dataclass(frozen=True)
class Question:
    """A question whose answer is on the page of its last hop.

    Attributes:
        id: Stable name.
        question: The text given to the model.
        answer: The reference answer.
        aliases: Other accepted forms of the answer.
        hops: A reference solution; two hops mean the first page names what the second is about.
    """

    id: str
    question: str
    answer: str
    aliases: tuple[str, ...]
    hops: tuple[Hop, ...]

    @property
    def answer_page(self) -> str:
        return self.hops[-1].page


def _read(name: str) -> dict:
    return json.loads(resources.files(__package__).joinpath("data").joinpath(name).read_text(encoding="utf-8"))


@functools.cache
def load_corpus() -> tuple[Page, ...]:
    """The bundled pages (package data ``data/corpus.json``)."""
    return tuple(Page(p["slug"], p["title"], p["text"]) for p in _read("corpus.json")["pages"])


@functools.cache
def load_questions() -> tuple[Question, ...]:
    """The bundled questions (package data ``data/tasks.json``)."""
    return tuple(
        Question(t["id"], t["question"], t["answer"], tuple(t.get("aliases", ())),
                 tuple(Hop(h["query"], h["page"]) for h in t["hops"]))
        for t in _read("tasks.json")["tasks"]
    )


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower().replace("'", "")) if w not in _STOPWORDS]


class SearchIndex:
    """BM25 over title and text (the title counted twice); results are deterministic, ties by slug."""

    def __init__(self, pages: tuple[Page, ...], k1: float = 1.2, b: float = 0.75):
        self.pages = pages
        self.k1, self.b = k1, b
        self._tf = [collections.Counter(_terms(f"{p.title} {p.title} {p.text}")) for p in pages]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = sum(self._len) / max(len(pages), 1)
        df = collections.Counter(term for tf in self._tf for term in tf)
        n = len(pages)
        self._idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}

    def _score(self, i: int, terms: list[str]) -> float:
        tf, norm = self._tf[i], self.k1 * (1 - self.b + self.b * self._len[i] / self._avg)
        return sum(self._idf.get(t, 0.0) * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms if tf[t])

    def search(self, query: str, k: int = 5) -> list[tuple[Page, str]]:
        """The ``k`` best pages for ``query`` with a snippet each (the sentence sharing most query terms)."""
        terms = list(dict.fromkeys(_terms(query)))
        scored = [(self._score(i, terms), p.slug, i) for i, p in enumerate(self.pages)]
        best = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[:k]
        return [(self.pages[i], self._snippet(self.pages[i].text, terms)) for _, _, i in best]

    def _snippet(self, text: str, terms: list[str], width: int = 200) -> str:
        """The sentence whose query terms weigh most (by idf); the first one on a tie."""
        wanted = set(terms)
        best = max(_SENTENCE.split(text), key=lambda s: sum(self._idf[t] for t in wanted & set(_terms(s))))
        return best if len(best) <= width else best[: width - 1].rstrip() + "…"


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the usual QA answer normalization)."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: tuple[str, ...]) -> float:
    """1.0 if the normalized prediction equals a normalized gold answer, else 0.0."""
    pred = normalize(prediction)
    return float(any(pred == normalize(g) for g in golds))


def token_f1(prediction: str, golds: tuple[str, ...]) -> float:
    """The best token-overlap F1 between the prediction and any gold answer (normalized)."""
    pred = normalize(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize(gold).split()
        common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
