"""``web-tools-v0``: answer questions by searching and reading pages served over real HTTP on loopback.

The env starts a :class:`~agentrl_envs.web_tools.server.CorpusServer` on ``127.0.0.1`` (ephemeral port) at
the first reset and stops it in ``close()``. The tools ``search(query)`` and ``open(url)`` reach it through
:func:`agentrl.http_tools.fetch`, whose allowlist holds that one host:port, so no tool call can reach any
other address. URLs shown to the model are paths (``/page/<name>``), so an episode's text does not depend
on the port.

Rewards (weights configurable): ``f1`` (token F1 of the final answer, weight 1) and ``exact`` (exact match,
weight 0, logged) at the end; ``found`` (weight 0.1) on the turn the page holding the answer is first opened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agentrl.errors import ConfigError, ToolCallError
from agentrl.http_tools import HostNotAllowedError, HTTPPolicy, HTTPToolError, fetch
from agentrl.rewards import RewardResult, compose, parse_weights
from agentrl.toolenv import Task, ToolEnv, Turn
from agentrl.tools import Tool, format_tool_calls
from agentrl.types import ToolCall
from agentrl_envs.web_tools.corpus import Question, exact_match, load_corpus, load_questions, token_f1
from agentrl_envs.web_tools.server import CorpusServer

__all__ = ["DEFAULT_WEIGHTS", "SYSTEM_PROMPT", "WebToolsEnv", "demonstration_actions"]

SYSTEM_PROMPT = (
    "Answer the user's question about the Marrow Archipelago by searching and reading its encyclopedia. "
    "search(query) lists matching pages with their URLs; open(url) returns a page's text. Look the facts up "
    "instead of guessing; some questions need two pages. When you know the answer, reply with "
    "<answer>the short answer</answer>."
)
DEFAULT_WEIGHTS: Mapping[str, float] = {"f1": 1.0, "exact": 0.0, "found": 0.1}
SPLITS = ("all", "train", "test")


def _split(questions: tuple[Question, ...], split: str) -> tuple[Question, ...]:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}; choose one of {SPLITS}")
    if split == "all":
        return questions
    # Every fourth question is held out, so both splits mix one- and two-hop questions.
    return tuple(q for i, q in enumerate(questions) if (i % 4 == 3) == (split == "test"))


def demonstration_actions(question: Question) -> tuple[str, ...]:
    """Assistant turns that solve ``question``: per hop a search then an open, then the answer."""
    actions: list[str] = []
    for hop in question.hops:
        actions.append(format_tool_calls([ToolCall("search", {"query": hop.query})]))
        actions.append(format_tool_calls([ToolCall("open", {"url": f"/page/{hop.page}"})]))
    actions.append(f"<answer>{question.answer}</answer>")
    return tuple(actions)


class WebToolsEnv(ToolEnv):
    """Questions answered by searching and reading pages over HTTP (async; tool calls; ORM + PRM).

    Args:
        split: ``"all"`` (40 questions), ``"train"`` (30) or ``"test"`` (10).
        weights: Overrides of :data:`DEFAULT_WEIGHTS`, e.g. ``{"exact": 1.0, "f1": 0.0}``.
        max_turns: Assistant turns before truncation.
        results: Search results per query.
        http_timeout: Seconds per HTTP attempt.
        retries: Retries after a 5xx answer or a transport error.
        max_page_bytes: Longer responses are cut.
        format_penalty: Subtracted on turns with malformed or invalid calls (component ``format``).

    Raises:
        ConfigError: An unknown split or weight name.
    """

    description = "Answer questions by searching and reading pages over HTTP on loopback (ORM: F1; PRM: page found)"

    def __init__(
        self,
        *,
        split: str = "all",
        weights: Mapping[str, float] | None = None,
        max_turns: int = 8,
        results: int = 5,
        http_timeout: float = 5.0,
        retries: int = 2,
        max_page_bytes: int = 20_000,
        format_penalty: float = 0.0,
    ):
        self.weights = {**DEFAULT_WEIGHTS, **parse_weights(weights, tuple(DEFAULT_WEIGHTS))}
        self.questions = {q.id: q for q in _split(load_questions(), split)}
        self.results, self._limits = results, (http_timeout, retries, max_page_bytes)
        self.server = CorpusServer(load_corpus())
        self._policy: HTTPPolicy | None = None
        tasks = [
            Task(q.question, q.answer, q.id, {"aliases": q.aliases, "answer_page": q.answer_page},
                 demonstration_actions(q))
            for q in self.questions.values()
        ]
        tools = [Tool.from_function(self.search, name="search"), Tool.from_function(self.open, name="open")]
        super().__init__(
            tools, tasks, self.outcome_reward, process_reward=self.found_reward, system_prompt=SYSTEM_PROMPT,
            max_turns=max_turns, tool_timeout=http_timeout * (retries + 2), format_penalty=format_penalty,
        )

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        if not self.server.running:
            self.server.start()
            timeout, retries, max_bytes = self._limits
            self._policy = HTTPPolicy((self.server.host,), timeout=timeout, retries=retries, max_bytes=max_bytes)
        return await super().areset(seed=seed, options=options)

    async def aclose(self) -> None:
        self.server.stop()
        self._policy = None
        await super().aclose()

    # ---- tools -------------------------------------------------------------------------------------
    async def search(self, query: str) -> str:
        """Search the encyclopedia; lists the best pages with their URLs and a snippet.

        Args:
            query: Words to look for, e.g. a name, a place or a topic.
        """
        response = await fetch(f"{self._base()}/search", self._require_policy(), params={"q": query, "k": self.results})
        if response.status != 200:
            raise HTTPToolError(f"search failed with HTTP {response.status}")
        hits = json.loads(response.text)["results"]
        if not hits:
            return f"No results for {query!r}. Try other words."
        return "\n".join(f"{i}. {h['title']}\n   URL: {h['url']}\n   {h['snippet']}" for i, h in enumerate(hits, 1))

    async def open(self, url: str) -> str:
        """Open a page of the encyclopedia and read its text.

        Args:
            url: A URL from the search results, e.g. /page/mount-tessel.
        """
        try:
            response = await fetch(self._resolve(url), self._require_policy())
        except HostNotAllowedError:
            # Said without the server's port, so an episode's text is the same on every run.
            raise ToolCallError(f"{url!r} is not on this site; open a URL from the search results, like "
                                "/page/<name>") from None
        if response.status != 200:
            raise ToolCallError(response.text.strip() or f"HTTP {response.status}")
        note = f"\n[page cut at {self._limits[2]} bytes]" if response.truncated else ""
        return response.text.rstrip("\n") + note

    def _base(self) -> str:
        return self.server.base_url

    def _require_policy(self) -> HTTPPolicy:
        if self._policy is None:
            raise RuntimeError("the corpus server is not running; call reset() first")
        return self._policy

    def _resolve(self, url: str) -> str:
        """A full URL for what the model wrote: a path, a bare page name, or a full URL (checked later)."""
        url = url.strip()
        if "://" in url:
            return url
        if url.startswith("/"):
            return self._base() + url
        return f"{self._base()}/page/{url}" if "/" not in url else f"{self._base()}/{url}"

    def _opened_path(self, url: Any) -> str:
        resolved = self._resolve(str(url))
        base = self._base()
        return resolved[len(base):].split("?")[0].split("#")[0] if resolved.startswith(base + "/") else ""

    # ---- rewards -----------------------------------------------------------------------------------
    def outcome_reward(self, task: Task, answer: str) -> RewardResult:
        """ORM: exact match and token F1 of the final answer against the answer and its aliases."""
        golds = (str(task.answer), *task.data.get("aliases", ()))
        raw = {"f1": token_f1(answer, golds), "exact": exact_match(answer, golds)}
        return compose(raw, {k: self.weights[k] for k in raw}, {"answer": answer})

    def found_reward(self, task: Task, turn: Turn) -> RewardResult:
        """PRM: 1 on the turn that first opens the page holding the answer, else 0."""
        target = f"/page/{task.data['answer_page']}"

        def opened(t: Turn) -> bool:
            return any(
                c.name == "open" and c.status == "ok" and self._opened_path(c.arguments.get("url", "")) == target
                for c in t.calls
            )

        found = opened(turn) and not any(opened(t) for t in turn.earlier)
        return compose({"found": float(found)}, {"found": self.weights["found"]})
