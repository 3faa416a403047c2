"""The openai backend: against a real ``vllm serve`` of the tiny model on loopback (exact ids and logprobs,
chat, the runner), and against a small scripted HTTP server for retries, backoff, timeouts, the
concurrency limit and the 4xx errors.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from _vllm_server import free_port, require_vllm, vllm_server

from agentrl.errors import ConfigError
from agentrl.models.chat import ChatRenderer
from agentrl.models.loading import load_model, load_tokenizer
from agentrl.models.tiny import tiny_model_path
from agentrl.rollout.hf import HFPolicy, sampling_logprobs
from agentrl.rollout.openai import (
    OpenAIError,
    OpenAIPolicy,
    chat_messages,
    generation_from_chat,
    generation_from_completion,
)
from agentrl.rollout.policy import Policy, SamplingParams, make_policy
from agentrl.tools import parse_tool_calls

GREEDY = SamplingParams(max_tokens=16, temperature=0)
COMPLETION = {
    "choices": [
        {
            "text": "",
            "token_ids": [7, 8, 2],
            "logprobs": {
                "tokens": ["token_id:7", "token_id:8", "token_id:2"],
                "token_logprobs": [-1.0, -2.0, -0.5],
            },
            "finish_reason": "stop",
        }
    ]
}


def run(coro):
    return asyncio.run(coro)


# ---- a scripted server -----------------------------------------------------------------------------
@dataclass
class Script:
    """Replies served in order (the last one repeats): ``(status, json body, headers, delay seconds)``."""

    replies: list[tuple[int, Any, dict[str, str], float]]
    requests: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def reply(status: int, body: Any, headers: dict[str, str] | None = None, delay: float = 0.0):
    return (status, body, headers or {}, delay)


@pytest.fixture
def scripted() -> Iterator[Callable[..., tuple[str, Script]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(*replies) -> tuple[str, Script]:
        script = Script(list(replies))

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self, body: Any) -> None:
                with script.lock:
                    script.requests.append((self.path, dict(self.headers), body))
                    index = min(len(script.requests), len(script.replies)) - 1
                    script.in_flight += 1
                    script.most_in_flight = max(script.most_in_flight, script.in_flight)
                status, payload, headers, delay = script.replies[index]
                if self.path.endswith("/models"):
                    status, payload, headers, delay = (
                        200,
                        {"data": [{"id": "served-a"}, {"id": "served-b"}]},
                        {},
                        0,
                    )
                time.sleep(delay)
                with script.lock:
                    script.in_flight -= 1
                data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                try:
                    self.send_response(status)
                    for key, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout test)
                    pass

            def do_POST(self) -> None:
                self._serve(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def do_GET(self) -> None:
                self._serve(None)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fast_policy(base_url: str, **options: Any) -> OpenAIPolicy:
    return OpenAIPolicy("m", base_url, backoff_s=0.01, max_backoff_s=0.05, **options)


def test_registered_and_a_policy():
    policy = make_policy("openai", model="m", base_url="http://127.0.0.1:1/v1")
    assert isinstance(policy, OpenAIPolicy) and isinstance(policy, Policy)


def test_token_prompt_request_and_reply(scripted, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    url, script = scripted(reply(200, COMPLETION))
    policy = fast_policy(url, api_key_env="MY_KEY")
    sampling = SamplingParams(max_tokens=5, temperature=0.7, top_k=4, stop_token_ids=(9,), seed=3)
    generation = run(policy.generate([1, 2, 3], sampling))
    assert generation.token_ids == (7, 8, 2) and generation.logprobs == (-1.0, -2.0, -0.5)
    assert generation.trainable and generation.finish_reason == "stop"
    path, headers, body = script.requests[0]
    assert path == "/v1/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["prompt"] == [1, 2, 3] and body["model"] == "m" and body["logprobs"] == 0
    assert (
        body["return_token_ids"]
        and body["return_tokens_as_token_ids"]
        and body["skip_special_tokens"] is False
    )
    assert (body["top_k"], body["stop_token_ids"], body["seed"], body["temperature"]) == (4, [9], 3, 0.7)
    # Without vLLM's fields nothing non-standard is sent; without a key, no Authorization header.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    run(fast_policy(url, vllm_fields=False).generate([1, 2, 3], sampling))
    _, headers, body = script.requests[1]
    assert "Authorization" not in headers
    assert not {"return_token_ids", "top_k", "stop_token_ids", "skip_special_tokens"} & set(body)


def test_replies_without_ids_are_text_only():
    ids_from_strings = {"choices": [{"text": "ab", "logprobs": {**COMPLETION["choices"][0]["logprobs"]}}]}
    assert generation_from_completion(ids_from_strings).token_ids == (7, 8, 2)
    text_only = generation_from_completion({"choices": [{"text": "hello", "finish_reason": "length"}]})
    assert text_only.token_ids == () and text_only.text == "hello" and not text_only.trainable
    assert text_only.finish_reason == "length"
    with pytest.raises(OpenAIError, match="no choices"):
        generation_from_completion({"error": "x"})


def test_chat_tool_calls_become_hermes_blocks():
    call = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"expr": "1+1"}'}}
    reply_body = {
        "choices": [
            {"message": {"content": "Let me add.", "tool_calls": [call]}, "finish_reason": "tool_calls"}
        ]
    }
    generation = generation_from_chat(reply_body)
    assert not generation.trainable and generation.token_ids == () and generation.finish_reason == "stop"
    parsed = parse_tool_calls(generation.text or "")
    assert [(c.name, dict(c.arguments)) for c in parsed.calls] == [("calc", {"expr": "1+1"})]
    assert parsed.content.strip() == "Let me add."


def test_chat_requests_carry_tools_and_tie_each_tool_reply_to_its_call(scripted):
    guess = {"type": "function", "function": {"name": "guess", "parameters": {"type": "object"}}}
    bare = {"name": "look", "parameters": {"type": "object"}}
    conversation = [
        {"role": "user", "content": "Find it."},
        {"role": "assistant", "content": 'Try two.\n<tool_call>\n{"name": "guess", "arguments": {"number": 2}}\n'
                                         '</tool_call>\n<tool_call>\n{"name": "look", "arguments": {}}\n</tool_call>'},
        {"role": "tool", "tool_call_id": "call_0", "name": "guess", "content": "higher"},
        {"role": "tool", "tool_call_id": "call_1", "name": "look", "content": "nothing"},
        {"role": "assistant", "content": "<tool_call>\n{bad json\n</tool_call>"},
        {"role": "tool", "tool_call_id": "", "name": "error", "content": "Error: malformed call"},
    ]
    url, script = scripted(reply(200, {"choices": [{"message": {"content": "<answer>7</answer>"}}]}))
    generation = run(fast_policy(url).generate(conversation, SamplingParams(max_tokens=8), tools=[guess, bare]))
    assert generation.text == "<answer>7</answer>" and not generation.trainable
    path, _, body = script.requests[0]
    assert path == "/v1/chat/completions"
    assert body["tools"] == [guess, {"type": "function", "function": bare}]
    sent = body["messages"]
    assert sent[1]["content"] == "Try two." and [c["id"] for c in sent[1]["tool_calls"]] == ["call_1_0", "call_1_1"]
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"number": 2}
    assert [(m["role"], m.get("tool_call_id")) for m in sent[2:4]] == [("tool", "call_1_0"), ("tool", "call_1_1")]
    # A malformed call has no structured call to answer: its error report goes back as a user message.
    assert "tool_calls" not in sent[4] and sent[5] == {"role": "user", "content": "Error: malformed call"}
    assert chat_messages(conversation[:1]) == conversation[:1]
    run(fast_policy(url).generate(conversation[:1], SamplingParams(max_tokens=8)))
    assert "tools" not in script.requests[1][2]


def test_retries_429_and_5xx_with_backoff(scripted):
    url, script = scripted(
        reply(503, {"error": {"message": "overloaded"}}),
        reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}),
        reply(200, COMPLETION),
    )
    generation = run(fast_policy(url).generate([1, 2], GREEDY))
    assert generation.token_ids == (7, 8, 2) and len(script.requests) == 3


def test_gives_up_after_retries_naming_status_and_message(scripted):
    url, script = scripted(reply(500, {"error": {"message": "engine exploded"}}))
    with pytest.raises(
        OpenAIError, match=r"answered 500: engine exploded \(gave up after 3 attempts\)"
    ) as info:
        run(fast_policy(url, retries=2).generate([1, 2], GREEDY))
    assert info.value.status == 500 and len(script.requests) == 3


@pytest.mark.parametrize(
    ("status", "message", "fix"),
    [
        (401, "Incorrect API key provided", r"set \$OPENAI_API_KEY"),
        (404, "The model `m` does not exist.", "Wrong model name 'm'.*serves: served-a, served-b"),
        (400, "maximum context length is 2048 tokens", "rejected the request"),
    ],
)
def test_4xx_is_a_config_error_at_once(scripted, status, message, fix):
    url, script = scripted(reply(status, {"error": {"message": message, "code": status}}))
    with pytest.raises(ConfigError, match=f"answered {status}: {message}.*{fix}"):
        run(fast_policy(url).generate([1, 2], GREEDY))
    assert len([r for r in script.requests if r[0].endswith("/completions")]) == 1  # never retried


def test_other_4xx_fails_without_retry(scripted):
    url, script = scripted(reply(418, b"teapot"))
    with pytest.raises(OpenAIError, match="answered 418: teapot") as info:
        run(fast_policy(url).generate([1, 2], GREEDY))
    assert info.value.status == 418 and not isinstance(info.value, ConfigError) and len(script.requests) == 1


def test_timeouts_are_retried_then_reported(scripted):
    url, script = scripted(reply(200, COMPLETION, delay=1.0), reply(200, COMPLETION))
    generation = run(fast_policy(url, timeout_s=0.3).generate([1, 2], GREEDY))  # the second attempt is quick
    assert generation.token_ids == (7, 8, 2) and len(script.requests) == 2
    url, _ = scripted(reply(200, COMPLETION, delay=1.0))
    with pytest.raises(OpenAIError, match=r"no reply after 2 attempts \(ReadTimeout"):
        run(fast_policy(url, timeout_s=0.2, retries=1).generate([1, 2], GREEDY))


def test_connection_refused_is_retried_then_reported():
    policy = fast_policy(f"http://127.0.0.1:{free_port()}/v1", retries=2)
    with pytest.raises(OpenAIError, match=r"no reply after 3 attempts \(ConnectError.*is the server running"):
        run(policy.generate([1, 2], GREEDY))


def test_concurrency_limit(scripted):
    url, script = scripted(reply(200, COMPLETION, delay=0.1))
    policy = fast_policy(url, max_concurrency=3)

    async def main():
        return await asyncio.gather(*(policy.generate([1, i], GREEDY) for i in range(10)))

    assert len(run(main())) == 10
    assert script.most_in_flight == 3


def test_bad_prompts_and_settings():
    policy = fast_policy("http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="non-empty"):
        run(policy.generate([], GREEDY))
    with pytest.raises(ConfigError, match="token ids or a list of chat messages"):
        run(policy.generate(["hello"], GREEDY))  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="cannot update a remote server's weights"):
        run(policy.update_weights({}))
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIPolicy("m", "127.0.0.1:8000/v1")


# ---- a real vllm serve -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    require_vllm()
    with vllm_server(str(tiny_model_path())) as served:
        yield served


@pytest.fixture(scope="module")
def prompts():
    renderer = ChatRenderer(load_tokenizer("tiny"))
    texts = ["Add 2 and 3.", "Write a function that reverses a list of numbers, then test it twice.", "Hi"]
    return [renderer.prompt_ids([{"role": "user", "content": t}]) for t in texts]


def served_policy(server, **options: Any) -> OpenAIPolicy:
    return OpenAIPolicy(server.model, server.base_url, max_context=2048, **options)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serve_greedy_ids_and_logprobs_match_hf(server, prompts):
    policy = served_policy(server)
    hf = HFPolicy("tiny")

    async def main():
        ours = await asyncio.gather(*(policy.generate(p, GREEDY) for p in prompts))
        theirs = await asyncio.gather(*(hf.generate(p, GREEDY) for p in prompts))
        await policy.aclose()
        await hf.aclose()
        return ours, theirs

    ours, theirs = run(main())
    for a, b in zip(ours, theirs, strict=True):
        assert a.trainable and a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serve_sampled_logprobs_and_stop_ids(server, prompts):
    sampling = SamplingParams(max_tokens=12, temperature=0.7, top_k=30, seed=5)
    generation = run(served_policy(server).generate(prompts[1], sampling))
    model = load_model("tiny")
    with torch.no_grad():
        logits = model(torch.tensor([[*prompts[1], *generation.token_ids]])).logits[
            0, len(prompts[1]) - 1 : -1
        ]
    expected = sampling_logprobs(logits, 0.7, 30, 1.0).gather(-1, torch.tensor(generation.token_ids)[:, None])
    assert list(generation.logprobs or ()) == pytest.approx(expected.squeeze(-1).tolist(), abs=1e-4)
    # A stop id ends the sample and is kept, as the ledger expects.
    full = run(served_policy(server).generate(prompts[0], GREEDY))
    stop = full.token_ids[4]
    cut = run(served_policy(server).generate(prompts[0], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=(stop,))))  # fmt: skip
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop) + 1] and cut.finish_reason == "stop"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serve_chat_and_wrong_model(server):
    policy = served_policy(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    generation = run(policy.generate(messages, SamplingParams(max_tokens=8, temperature=1.0, seed=1)))
    assert not generation.trainable and generation.token_ids == () and isinstance(generation.text, str)
    assert generation.finish_reason in ("stop", "length")
    with pytest.raises(ConfigError, match=r"answered 404.*Wrong model name 'nope'.*serves: tiny"):
        run(OpenAIPolicy("nope", server.base_url).generate([1, 2, 3], GREEDY))


@pytest.mark.vllm
@pytest.mark.slow
def test_runner_on_vllm_serve(server):
    from agentrl.rollout.runner import rollout

    sampling = SamplingParams(max_tokens=8, temperature=1.0)
    groups = rollout(
        "toy-echo-v0", served_policy(server), load_tokenizer("tiny"), 4, group_size=2, sampling=sampling
    )
    trajectories = [t for g in groups for t in g.trajectories]
    assert len(trajectories) == 8
    for t in trajectories:
        assert t.error is None and t.trainable
        assert all(lp < 0 for lp, m in zip(t.logprobs, t.loss_mask, strict=True) if m)
    # The chat path, as for an API model: the server renders the conversation; text only, never trained on.
    groups = rollout("toy-echo-v0", served_policy(server), load_tokenizer("tiny"), 2, sampling=sampling,
                     prompt_format="messages")  # fmt: skip
    chats = [t for g in groups for t in g.trajectories]
    assert len(chats) == 2 and all(t.error is None and not t.trainable and len(t.turns) >= 1 for t in chats)
