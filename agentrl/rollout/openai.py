"""The ``openai`` backend: any OpenAI-compatible HTTP server, through an ``httpx`` async client.

Two kinds of prompt, two endpoints:

- **Token ids** go to ``/v1/completions`` as a token-array prompt. With ``vllm_fields=True`` (the default)
  the request also asks a vLLM server for the sampled ids (``return_token_ids``, and
  ``return_tokens_as_token_ids`` in the logprobs as a second source) and each sampled token's logprob
  (``logprobs=0``), so the ids are exact and the generation is ``trainable``. Start the server with
  ``--logprobs-mode processed_logprobs`` for those logprobs to be the ones of the distribution sampled from
  (vLLM's default reports the untempered model's; see :mod:`agentrl.rollout.vllm`). A server that returns no
  ids gives text only and ``trainable=False``.
- **Messages** go to ``/v1/chat/completions`` (API models, for evaluation). The reply is text only
  (``trainable=False``); tool calls the server returns as structured ``tool_calls`` are written into the
  text as Hermes ``<tool_call>`` blocks, the format the envs parse. The turn's cap goes as ``max_tokens``,
  or as ``max_completion_tokens`` from the first reply that asks for it (reasoning models refuse the other).

:meth:`OpenAIPolicy.aprobe` asks ``/models`` once before a run, so a wrong model name fails in a second with
the names the server serves, instead of as one failed episode per task.

Requests run at most ``max_concurrency`` at a time. Timeouts, 408/409/429/5xx replies and connection errors
are retried with exponential backoff (honouring ``Retry-After``); other 4xx replies fail at once with the
status and the server's own message: 400/401/403/404/422 as :class:`~agentrl.errors.ConfigError` naming the
likely fix (the model name, the API key, the base URL).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from agentrl.errors import AgentRLError, ConfigError, MissingDependencyError
from agentrl.rollout.policy import Generation, SamplingParams
from agentrl.types import Message, ToolSchema

__all__ = ["OpenAIError", "OpenAIPolicy", "chat_messages", "generation_from_chat", "generation_from_completion"]

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
_TOKEN_ID = re.compile(r"token_id:(\d+)")


class OpenAIError(AgentRLError, RuntimeError):
    """The server failed a request (after the retries, for retryable failures).

    Attributes:
        status: the HTTP status, or None when no reply came (connection error, timeout).
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class OpenAIPolicy:
    """An OpenAI-compatible server as a :class:`~agentrl.rollout.policy.Policy` (registered as ``"openai"``).

    Args:
        model: the model name the server knows (``vllm serve --served-model-name``, or an API model id).
        base_url: the API root, up to and including ``/v1`` (e.g. ``http://127.0.0.1:8000/v1``).
        api_key: the bearer token; None: read from the environment variable ``api_key_env`` (no header
            when that is unset too, as a local server needs none).
        api_key_env: the environment variable holding the key.
        max_context: the server model's context window (prompt + sampled tokens).
        max_concurrency: requests in flight at once.
        timeout_s: seconds for one attempt, from sending to the last byte of the reply.
        connect_timeout_s: seconds to open a connection.
        retries: further attempts after a retryable failure (timeouts, 408/409/429/5xx, connection errors).
        backoff_s: the first retry's delay; it doubles each attempt (with jitter), capped by ``max_backoff_s``.
        vllm_fields: send vLLM's request extensions with token-id prompts (``return_token_ids``,
            ``return_tokens_as_token_ids``, ``top_k``, ``stop_token_ids``, ``skip_special_tokens``); turn off
            for servers that reject fields they do not know.
        headers: extra HTTP headers for every request.

    Raises:
        ConfigError: an invalid setting.
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        *,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_context: int = 32_768,
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        vllm_fields: bool = True,
        headers: Mapping[str, str] | None = None,
    ):
        if not model:
            raise ConfigError("OpenAIPolicy needs model= (the name the server serves the model under)")
        if not re.match(r"^https?://", base_url):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_context < 2:
            raise ConfigError("timeouts must be > 0, retries and backoff_s >= 0, max_context >= 2")
        self.model, self.base_url = model, base_url.rstrip("/")
        self.api_key_env = api_key_env
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env) or None
        self.max_context = max_context
        self.max_concurrency = max_concurrency
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.vllm_fields = vllm_fields
        self.headers = dict(headers or {})
        self.version = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        self._max_tokens_field = "max_tokens"  # chat: "max_completion_tokens" once a server asks for it

    # ---- Policy protocol ---------------------------------------------------------------------------
    async def generate(
        self,
        prompt: Sequence[int] | Sequence[Message],
        sampling: SamplingParams,
        *,
        tools: Sequence[ToolSchema] | None = None,
    ) -> Generation:
        """Sample one continuation: token ids through ``/completions``, messages through ``/chat/completions``.

        Raises:
            ConfigError: an empty or mixed prompt; a 400/401/403/404/422 reply (the message names the fix).
            OpenAIError: the server failed (after retries), or the reply cannot be read.
        """
        if not prompt:
            raise ConfigError("the openai backend needs a non-empty prompt (token ids or chat messages)")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
            body = self._completion_body(ids, sampling)
            return generation_from_completion(await self._post("/completions", body))
        if all(isinstance(m, Mapping) and "role" in m for m in prompt):
            body = self._chat_body(prompt, sampling, tools)  # type: ignore[arg-type]
            try:
                reply = await self._post("/chat/completions", body)
            except ConfigError as exc:
                # Reasoning models refuse max_tokens and name its successor: switch once, for good.
                if self._max_tokens_field != "max_tokens" or "max_completion_tokens" not in str(exc):
                    raise
                self._max_tokens_field = "max_completion_tokens"
                body["max_completion_tokens"] = body.pop("max_tokens")
                reply = await self._post("/chat/completions", body)
            return generation_from_chat(reply)
        raise ConfigError(
            "prompt must be a list of token ids or a list of chat messages ({'role', 'content'})"
        )

    async def aprobe(self) -> None:
        """Ask the server which models it serves (``GET /models``) before any episode is played.

        A server that does not list models (no such endpoint, or a reply of another shape) passes: the first
        request will tell. Closes nothing; call :meth:`aclose` after.

        Raises:
            ConfigError: the server serves other models than ``model`` (the message lists them), or the key
                is refused (401/403).
            OpenAIError: no reply from ``base_url`` (after retries).
        """
        import httpx

        client, _ = self._session()
        url = f"{self.base_url}/models"
        for attempt in range(self.retries + 1):
            try:
                response = await client.get(url)
                break
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if attempt == self.retries:
                    raise OpenAIError(
                        f"{url}: no reply after {attempt + 1} attempts ({type(exc).__name__}: {exc}); is the "
                        "server running and reachable at base_url?"
                    ) from exc
                await asyncio.sleep(self._delay(attempt, None))
        if response.status_code in (401, 403):
            raise await self._status_error(url, response, 1)
        served = _model_ids(response) if response.status_code == 200 else None
        if served and self.model not in served:
            shown = ", ".join(served[:10]) + (f" (and {len(served) - 10} more)" if len(served) > 10 else "")
            raise ConfigError(
                f"{self.base_url} does not serve a model named {self.model!r}; it serves: {shown}. "
                f"Pass one of those as the model name (e.g. --model {served[0]}), or --no-model-check where the "
                "server takes names it does not list"
            )

    async def update_weights(self, named_tensors: Any) -> None:
        """A remote server's weights are not ours to change.

        Raises:
            ConfigError: always; sync a served vLLM model through its own weight-transfer endpoints.
        """
        raise ConfigError(
            "the openai backend cannot update a remote server's weights; train with the hf or vllm backend, "
            "or push weights to a vLLM server through its weight-transfer API"
        )

    async def aclose(self) -> None:
        """Close the HTTP client. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

    # ---- requests ----------------------------------------------------------------------------------
    def _completion_body(self, ids: list[int], sampling: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": ids,
            "max_tokens": min(sampling.max_tokens, max(1, self.max_context - len(ids))),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "logprobs": 0,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if self.vllm_fields:
            body.update(return_token_ids=True, return_tokens_as_token_ids=True, skip_special_tokens=False)
            if sampling.top_k:
                body["top_k"] = sampling.top_k
            if sampling.stop_token_ids:
                body["stop_token_ids"] = list(sampling.stop_token_ids)
        return body

    def _chat_body(
        self, messages: Sequence[Message], sampling: SamplingParams, tools: Sequence[ToolSchema] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": chat_messages(messages),
            self._max_tokens_field: sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if tools:
            body["tools"] = [dict(t) if "type" in t else {"type": "function", "function": dict(t)} for t in tools]
        return body

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with the concurrency limit, retries and backoff; the decoded JSON reply."""
        import httpx

        client, slots = self._session()
        url = f"{self.base_url}{path}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            async with slots:
                try:
                    response = await client.post(url, json=body)
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    if last:
                        raise OpenAIError(
                            f"{url}: no reply after {attempt + 1} attempts ({type(exc).__name__}: {exc}); is the "
                            "server running and reachable at base_url?"
                        ) from exc
                    await asyncio.sleep(self._delay(attempt, None))
                    continue
            if response.status_code < 400:
                try:
                    decoded = response.json()
                except ValueError as exc:
                    raise OpenAIError(f"{url}: the reply is not JSON: {response.text[:200]!r}") from exc
                if not isinstance(decoded, dict):
                    raise OpenAIError(f"{url}: the reply is not a JSON object: {response.text[:200]!r}")
                return decoded
            if response.status_code in RETRY_STATUSES and not last:
                await asyncio.sleep(self._delay(attempt, response.headers.get("retry-after")))
                continue
            raise await self._status_error(url, response, attempt + 1)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff with jitter; a server's ``Retry-After`` (seconds) wins, within the cap."""
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff_s)
            except ValueError:
                pass
        return float(min(self.backoff_s * 2**attempt, self.max_backoff_s) * random.uniform(0.5, 1.0))

    async def _status_error(self, url: str, response: Any, attempts: int) -> AgentRLError:
        status, detail = response.status_code, _server_message(response)
        where = f"{url} answered {status}: {detail}"
        if status == 401:
            return ConfigError(
                f"{where}. The API key is missing or wrong: set ${self.api_key_env} (or pass api_key=)."
            )
        if status == 403:
            return ConfigError(f"{where}. The API key may not use this model or endpoint.")
        if status == 404:
            models = await self._served_models()
            hint = f"the server serves: {', '.join(models)}" if models else "check base_url (it ends in /v1)"
            return ConfigError(f"{where}. Wrong model name {self.model!r} or wrong base_url; {hint}.")
        if status in (400, 422):
            return ConfigError(f"{where}. The server rejected the request as sent (see its message above).")
        if status in RETRY_STATUSES:
            return OpenAIError(f"{where} (gave up after {attempts} attempts)", status)
        return OpenAIError(where, status)

    async def _served_models(self) -> list[str]:
        """The model ids ``/models`` lists, for a 404's hint (empty when that fails too)."""
        client, _ = self._session()
        try:
            response = await client.get(f"{self.base_url}/models")
        except Exception:
            return []
        return (_model_ids(response) or [])[:10] if response.status_code == 200 else []

    def _session(self) -> tuple[Any, asyncio.Semaphore]:
        """The client and concurrency limit of the running event loop (made afresh for a new loop)."""
        if self._closed:
            raise OpenAIError("the openai policy was closed; make a new one")
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._client is None or self._slots is None:
            try:
                import httpx
            except ImportError as exc:
                raise MissingDependencyError(
                    f"the openai backend needs httpx: pip install httpx ({exc})"
                ) from exc
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            limits = httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            )
            timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
            self._client = httpx.AsyncClient(
                headers={**headers, **self.headers}, timeout=timeout, limits=limits
            )
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        return self._client, self._slots


# ---- reading replies (pure functions) ----------------------------------------------------------------
def generation_from_completion(reply: Mapping[str, Any]) -> Generation:
    """A ``/completions`` reply as a :class:`Generation`: exact ids and logprobs where the server sent them.

    Ids come from ``choices[0].token_ids`` (vLLM's ``return_token_ids``), else from ``token_id:<id>``
    strings in ``logprobs.tokens`` (``return_tokens_as_token_ids``). ``trainable`` when both ids and one
    logprob per id are there.

    Raises:
        OpenAIError: the reply has no ``choices``.
    """
    choice = _first_choice(reply)
    logprob_block = choice.get("logprobs") or {}
    ids = _ids_from(choice.get("token_ids"), logprob_block.get("tokens"))
    logprobs = _floats(logprob_block.get("token_logprobs"))
    text = choice.get("text")
    if ids is None:
        return Generation(
            (), None, _finish(choice), text=text or "", trainable=False, metadata={"reply": "text"}
        )
    if logprobs is not None and len(logprobs) != len(ids):
        logprobs = None
    return Generation(ids, logprobs, _finish(choice), text=text, trainable=logprobs is not None)


def chat_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The conversation as chat APIs want it: tool calls structured, each tool reply tied to its call.

    Assistant turns hold Hermes ``<tool_call>`` blocks as text (that is what envs parse); chat APIs reject
    a ``tool`` message unless the assistant message before it lists the call in ``tool_calls`` with the same
    id. Calls get ids ``call_<turn>_<k>`` where they have none, and the tool messages after an assistant
    turn take those ids in order; a tool message with no call left to answer (e.g. the env's report of a
    malformed call) is sent as a user message.
    """
    from agentrl.tools import parse_tool_calls

    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for turn, message in enumerate(messages):
        entry = dict(message)
        if entry.get("role") == "assistant" and not entry.get("tool_calls"):
            parsed = parse_tool_calls(str(entry.get("content") or ""))
            pending = [f"call_{turn}_{k}" for k in range(len(parsed.calls))]
            if parsed.calls:
                entry["content"] = parsed.content or None
                entry["tool_calls"] = [
                    {"id": call_id, "type": "function",
                     "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
                    for call_id, call in zip(pending, parsed.calls, strict=True)
                ]
        elif entry.get("role") == "tool":
            if pending:
                entry["tool_call_id"] = pending.pop(0)
            else:
                entry = {"role": "user", "content": str(entry.get("content") or "")}
        out.append(entry)
    return out


def generation_from_chat(reply: Mapping[str, Any]) -> Generation:
    """A ``/chat/completions`` reply as a text-only :class:`Generation` (tool calls as Hermes blocks).

    Raises:
        OpenAIError: the reply has no ``choices`` or no ``message``.
    """
    choice = _first_choice(reply)
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise OpenAIError(f"the chat reply has no message: {json.dumps(choice)[:200]}")
    parts = [message.get("content") or ""]
    calls = message.get("tool_calls") or []
    for call in calls:
        function = call.get("function", {})
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # malformed arguments stay a string: the env reports the malformed call to the model
        block = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
        parts.append(f"<tool_call>\n{block}\n</tool_call>")
    text = "\n".join(p for p in parts if p)
    metadata = {"tool_calls": list(calls)} if calls else {}
    return Generation((), None, _finish(choice), text=text, trainable=False, metadata=metadata)


def _first_choice(reply: Mapping[str, Any]) -> Mapping[str, Any]:
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise OpenAIError(f"the reply has no choices: {json.dumps(reply)[:200]}")
    return choices[0]


def _finish(choice: Mapping[str, Any]) -> Any:
    return "length" if choice.get("finish_reason") == "length" else "stop"


def _ids_from(token_ids: Any, tokens: Any) -> tuple[int, ...] | None:
    if isinstance(token_ids, list) and all(isinstance(t, int) for t in token_ids):
        return tuple(token_ids)
    if isinstance(tokens, list) and tokens:
        matches = [_TOKEN_ID.fullmatch(t) if isinstance(t, str) else None for t in tokens]
        if all(matches):
            return tuple(int(m.group(1)) for m in matches if m)
    return None


def _floats(values: Any) -> tuple[float, ...] | None:
    if isinstance(values, list) and all(isinstance(v, int | float) for v in values):
        return tuple(float(v) for v in values)
    return None


def _model_ids(response: Any) -> list[str] | None:
    """The ids of a ``/models`` reply (``{"data": [{"id": ...}, ...]}``), or None for another shape."""
    try:
        data = response.json()["data"]
        return [str(m["id"]) for m in data]
    except (ValueError, KeyError, TypeError):
        return None


def _server_message(response: Any) -> str:
    """The error text of an OpenAI-style error body (``{"error": {"message": ...}}``), else the raw body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, Mapping) and error.get("message"):
        return str(error["message"])[:500]
    if isinstance(error, str):
        return error[:500]
    if isinstance(body, dict) and body.get("message"):  # some servers answer {"message": ...}
        return str(body["message"])[:500]
    return json.dumps(body)[:300]
