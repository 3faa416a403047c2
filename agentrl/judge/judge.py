"""An LLM as a judge: pointwise scores against a rubric and pairwise preferences, over any policy backend.

Every call of a batch is sent at once (the backend batches them), each with a time limit; a call that
fails, times out or answers without a valid verdict is retried (a parse failure only when sampling can
change the answer, i.e. temperature > 0) and, if it still fails, comes back as a verdict with ``error``
set and the raw text kept: a judge failure marks that sample and never raises out of a batch.

Answers are cached by a hash of what was asked (the judge's name, the rendered conversation and the
sampling settings), in memory and optionally in a JSONL file, so a repeated question, a rerun or a resumed
run costs nothing. Only valid answers are cached.

A pairwise question is asked in both orders (A = first, then A = second): position bias cancels, and the
two orders disagreeing counts as a tie (``consistent=False``). Ties are verdicts too.

Usage::

    from agentrl.judge import Judge

    judge = Judge.from_pretrained("Qwen/Qwen2.5-7B-Instruct")  # or Judge.from_endpoint(url, model)
    verdicts = judge.score([("What is 2+2?", "4"), ("What is 2+2?", "5")])
    [v.score for v in verdicts]  # in [0, 1], None where the judge failed
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agentrl.errors import ConfigError
from agentrl.judge import verdicts as _v
from agentrl.judge.verdicts import Parsed
from agentrl.rollout.complete import acomplete
from agentrl.rollout.policy import Policy, SamplingParams
from agentrl.types import Message

__all__ = ["Judge", "JudgeCache", "PairVerdict", "Verdict"]

GREEDY = SamplingParams(max_tokens=256, temperature=0.0)
"""The default judge sampling: greedy, so verdicts are reproducible (and cacheable)."""

T = TypeVar("T")
PointItem = tuple[Any, str]
"""``(prompt, response)``: the prompt a str or a list of chat messages."""
PairItem = tuple[Any, str, str]
"""``(prompt, first, second)``."""


@dataclass(frozen=True)
class Verdict:
    """One judge answer.

    Attributes:
        score: the parsed value in [0, 1] (pointwise: the score mapped from the scale; one pairwise order:
            the preference for the response shown as A), or None when the judge failed.
        raw: the judge's text (None when no text came back).
        error: why the verdict failed, or None.
        attempts: calls made (0 when the answer came from the cache).
    """

    score: float | None
    raw: str | None
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.score is not None

    @property
    def cached(self) -> bool:
        return self.attempts == 0


@dataclass(frozen=True)
class PairVerdict:
    """A pairwise judgement of ``(prompt, first, second)``, asked in both orders.

    Attributes:
        preference: how much ``first`` is preferred: 1.0 better, 0.0 worse, 0.5 a tie (a tie verdict, or
            the two orders disagreeing); the mean of the two orders' preferences. None when either failed.
        forward: the verdict with ``first`` shown as A; ``backward``: with ``second`` shown as A.
        consistent: the two orders agree (None when either failed).
    """

    preference: float | None
    forward: Verdict
    backward: Verdict

    @property
    def ok(self) -> bool:
        return self.preference is not None

    @property
    def consistent(self) -> bool | None:
        if not self.ok:
            return None
        assert self.forward.score is not None and self.backward.score is not None
        return self.forward.score == 1.0 - self.backward.score

    @property
    def error(self) -> str | None:
        if self.ok:
            return None
        return "; ".join(f"{side}: {v.error}" for side, v in (("A=first", self.forward), ("A=second", self.backward))
                         if v.error)  # fmt: skip


class JudgeCache:
    """Judge answers by request hash, in memory and (with ``path``) appended to a JSONL file that a later
    cache with the same path reads back. Thread-safe."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        if self.path is not None and self.path.is_file():
            for _number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    record = json.loads(line)
                    self._answers[record["key"]] = record["text"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash: that answer is asked again
        elif self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        with self._lock:
            text = self._answers.get(key)
            if text is None:
                self.misses += 1
            else:
                self.hits += 1
            return text

    def put(self, key: str, text: str) -> None:
        with self._lock:
            if key in self._answers:
                return
            self._answers[key] = text
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps({"key": key, "text": text}) + "\n")


def request_key(name: str, conversation: Sequence[Message], sampling: SamplingParams) -> str:
    """The cache key of one judge request: a SHA-256 of the judge's name, the conversation and sampling."""
    blob = json.dumps([name, list(conversation), dataclasses.asdict(sampling)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Judge:
    """A policy backend used as a judge.

    Args:
        policy: any backend (``HFPolicy``, ``VLLMPolicy``, ``OpenAIPolicy``).
        renderer: the judge tokenizer's ``ChatRenderer`` for token-id backends; None sends chat messages
            (an OpenAI-compatible chat endpoint).
        name: identifies the judge model in cache keys (e.g. its path or hub id); change it when the weights
            change.
        rubric: what a good response is, put into both templates.
        scale: the integer range of pointwise scores, e.g. (1, 10); scores come back mapped to [0, 1].
        pointwise_template / pairwise_template / system: the questions (see :mod:`agentrl.judge.verdicts`).
        sampling: how the judge samples; greedy by default, so its verdicts are reproducible.
        timeout_s: the most seconds one call may take. retries: further attempts of a failed call.
        cache: a :class:`JudgeCache`, a JSONL path for one, or None for an in-memory cache.
        batch_size: the most calls in flight at once.
    """

    def __init__(self, policy: Policy, renderer: Any = None, *, name: str = "judge",
                 rubric: str = _v.DEFAULT_RUBRIC, scale: tuple[int, int] = (1, 10),
                 pointwise_template: str = _v.POINTWISE_TEMPLATE, pairwise_template: str = _v.PAIRWISE_TEMPLATE,
                 system: str | None = _v.SYSTEM_PROMPT,
                 sampling: SamplingParams = GREEDY,
                 timeout_s: float | None = 60.0, retries: int = 2, cache: JudgeCache | str | Path | None = None,
                 batch_size: int = 64):  # fmt: skip
        if len(scale) != 2 or int(scale[0]) >= int(scale[1]):
            raise ConfigError(f"scale must be (low, high) integers with low < high, got {scale!r}")
        if retries < 0 or batch_size < 1 or (timeout_s is not None and timeout_s <= 0):
            raise ConfigError("retries must be >= 0, batch_size >= 1 and timeout_s > 0 (or None)")
        self.policy, self.renderer, self.name = policy, renderer, name
        self.rubric, self.scale, self.system = rubric, (int(scale[0]), int(scale[1])), system
        self.pointwise_template, self.pairwise_template = pointwise_template, pairwise_template
        self.sampling, self.timeout_s, self.retries, self.batch_size = (
            sampling,
            timeout_s,
            retries,
            batch_size,
        )
        self.cache = cache if isinstance(cache, JudgeCache) else JudgeCache(cache)
        self.calls = self.failures = 0
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def from_pretrained(cls, model: str | Path, *, device: Any = "cpu", template: str | None = None,
                        **options: Any) -> Judge:  # fmt: skip
        """A local model (a directory or hub id) judged with the ``hf`` backend; ``options`` go to the
        constructor (``name`` defaults to ``str(model)``)."""
        from agentrl.models.chat import ChatRenderer
        from agentrl.rollout.hf import HFPolicy

        policy = HFPolicy(str(model), device=device)
        options.setdefault("name", str(model))
        return cls(policy, ChatRenderer(policy.tokenizer, template=template), **options)

    @classmethod
    def from_endpoint(cls, base_url: str, model: str, *, api_key: str | None = None, **options: Any) -> Judge:
        """A model behind an OpenAI-compatible chat endpoint (``vllm serve``, an API)."""
        from agentrl.rollout.openai import OpenAIPolicy

        options.setdefault("name", f"{base_url}#{model}")
        return cls(OpenAIPolicy(model, base_url, api_key=api_key), None, **options)

    # ---- questions ---------------------------------------------------------------------------------
    async def ascore(self, items: Sequence[PointItem]) -> list[Verdict]:
        """A pointwise verdict for each ``(prompt, response)``, in order."""
        conversations = [
            _v.pointwise_messages(p, r, rubric=self.rubric, scale=self.scale, template=self.pointwise_template,
                                  system=self.system)
            for p, r in items
        ]  # fmt: skip
        return await self._ask(conversations, lambda text: _v.parse_score(text, self.scale))

    async def acompare(self, items: Sequence[PairItem]) -> list[PairVerdict]:
        """A :class:`PairVerdict` for each ``(prompt, first, second)``, each asked in both orders."""
        conversations = []
        for prompt, first, second in items:
            for a, b in ((first, second), (second, first)):
                conversations.append(_v.pairwise_messages(prompt, a, b, rubric=self.rubric,
                                                          template=self.pairwise_template, system=self.system))  # fmt: skip
        answers = await self._ask(conversations, _v.parse_preference)
        out = []
        for forward, backward in zip(answers[0::2], answers[1::2], strict=True):
            both = forward.score is not None and backward.score is not None
            preference = (forward.score + 1.0 - backward.score) / 2 if both else None  # type: ignore[operator]
            out.append(PairVerdict(preference, forward, backward))
        return out

    def score(self, items: Sequence[PointItem]) -> list[Verdict]:
        """:meth:`ascore` from synchronous code (also from inside a running event loop)."""
        return self._sync(lambda: self.ascore(items))

    def compare(self, items: Sequence[PairItem]) -> list[PairVerdict]:
        """:meth:`acompare` from synchronous code (also from inside a running event loop)."""
        return self._sync(lambda: self.acompare(items))

    async def aclose(self) -> None:
        """Release the backend and the helper thread. Idempotent."""
        await self.policy.aclose()
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None

    # ---- the calls ---------------------------------------------------------------------------------
    async def _ask(self, conversations: list[list[Message]], parse: Callable[[str], Parsed]) -> list[Verdict]:
        keys = [request_key(self.name, c, self.sampling) for c in conversations]
        results: list[Verdict | None] = [None] * len(conversations)
        for i, key in enumerate(keys):
            text = self.cache.get(key)
            if text is not None:
                parsed = parse(text)
                results[i] = Verdict(parsed.value, text, parsed.error, attempts=0)
        pending = [i for i, r in enumerate(results) if r is None]
        attempt = 0
        while pending:
            attempt += 1
            sampling = self.sampling if attempt == 1 else dataclasses.replace(
                self.sampling, seed=(self.sampling.seed or 0) + attempt - 1)  # fmt: skip
            retry = []
            for start in range(0, len(pending), self.batch_size):
                chunk = pending[start : start + self.batch_size]
                done = await acomplete(self.policy, [conversations[i] for i in chunk], sampling, self.renderer,
                                       timeout_s=self.timeout_s)  # fmt: skip
                self.calls += len(chunk)
                for i, completion in zip(chunk, done, strict=True):
                    if completion.text is None:
                        results[i] = Verdict(None, None, completion.error, attempt)
                    else:
                        parsed = parse(completion.text)
                        results[i] = Verdict(parsed.value, completion.text, parsed.error, attempt)
                        if parsed.value is not None:
                            self.cache.put(keys[i], completion.text)
                    verdict = results[i]
                    assert verdict is not None
                    retryable = verdict.raw is None or self.sampling.temperature > 0
                    if not verdict.ok and retryable and attempt <= self.retries:
                        retry.append(i)
            pending = retry
        verdicts = [r for r in results if r is not None]
        self.failures += sum(not v.ok for v in verdicts)
        return verdicts

    def _sync(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine to its end from synchronous code; inside a running loop, on a helper thread."""

        async def main() -> T:
            return await make()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(main())
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agentrl-judge")
        coroutine: Coroutine[Any, Any, T] = main()
        return self._thread.submit(asyncio.run, coroutine).result()
