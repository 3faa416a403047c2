"""web-tools-v0: the corpus, the loopback HTTP service, scripted episodes, rewards, and its network boundary."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
import urllib.request

import gymnasium
import pytest
from agentrl_envs.web_tools import WebToolsEnv
from agentrl_envs.web_tools.corpus import (
    SearchIndex,
    exact_match,
    load_corpus,
    load_questions,
    normalize,
    token_f1,
)
from agentrl_envs.web_tools.server import CorpusServer

import agentrl
from agentrl.checker import check_env
from agentrl.errors import ConfigError
from agentrl.tools import format_tool_calls
from agentrl.types import ToolCall

QUESTIONS = load_questions()
PAGES = {p.slug: p for p in load_corpus()}

_SEEN: list[object] = []
_WATCHING = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if _WATCHING.is_set() and event in ("socket.connect", "socket.getaddrinfo"):
        _SEEN.append(args[1] if event == "socket.connect" else args[0])


sys.addaudithook(_audit)


def call(name: str, **arguments) -> str:
    return format_tool_calls([ToolCall(name, arguments)])


@pytest.fixture(scope="module")
def env():
    e = WebToolsEnv()
    yield e
    e.close()


# ---------------------------------------------------------------------------------------------- corpus


def test_the_corpus_is_consistent():
    assert len(PAGES) == len(load_corpus()) >= 30 and len(QUESTIONS) >= 30
    assert len({q.id for q in QUESTIONS}) == len(QUESTIONS)
    assert sum(len(q.hops) == 2 for q in QUESTIONS) >= 10
    for q in QUESTIONS:
        assert all(hop.page in PAGES for hop in q.hops), q.id
        page_text = normalize(PAGES[q.answer_page].text)
        assert any(normalize(a) in page_text for a in (q.answer, *q.aliases)), q.id


def test_each_hop_query_finds_its_page_in_the_top_three():
    index = SearchIndex(load_corpus())
    for q in QUESTIONS:
        for hop in q.hops:
            assert hop.page in [p.slug for p, _ in index.search(hop.query, 3)], (q.id, hop)


def test_answer_scoring():
    assert exact_match("The Brask Cup.", ("the Brask Cup",)) == 1.0
    assert exact_match("1412", ("1,412 metres", "1412")) == 1.0
    assert exact_match("Brask", ("the Brask Cup",)) == 0.0
    assert token_f1("Brask", ("the Brask Cup",)) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("Caspar Lund", ("Caspar Lund",)) == 1.0
    assert token_f1("", ("Caspar Lund",)) == 0.0


# ---------------------------------------------------------------------------------------------- server


def test_the_server_answers_search_and_pages_over_http_and_stops():
    with CorpusServer(load_corpus()) as server:
        base = server.base_url
        assert base.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{base}/search?q=Velm+Lighthouse&k=2") as response:
            found = json.load(response)
        assert [r["url"] for r in found["results"]] == ["/page/velm-lighthouse", "/page/velm"]
        with urllib.request.urlopen(f"{base}/page/velm-lighthouse") as response:
            assert response.read().decode().startswith("Velm Lighthouse\n\nThe Velm Lighthouse was built in 1788")
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{base}/page/nowhere")
        port = server._server.server_address[1]  # type: ignore[union-attr]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


# ---------------------------------------------------------------------------------------------- episodes


def test_a_scripted_policy_solves_every_task_end_to_end(env):
    for q in QUESTIONS:
        obs, _ = env.reset(seed=0, options={"task": q.id})
        assert obs[1]["content"] == q.question
        rewards, found_on = [], []
        for hop in q.hops:
            results = env.step(call("search", query=hop.query))
            assert f"URL: /page/{hop.page}" in results.observation[0]["content"]
            rewards.append(results.reward)
            page = env.step(call("open", url=f"/page/{hop.page}"))
            assert page.observation[0]["content"].startswith(PAGES[hop.page].title + "\n\n")
            rewards.append(page.reward)
            found_on.append(page.info["reward_components"]["found"])
        final = env.step(f"<answer>{q.answer}</answer>")
        assert (final.terminated, final.truncated) == (True, False)
        assert final.info["reward_components"] == {"found": 0.0, "f1": 1.0, "exact": 0.0}
        assert found_on[-1] == pytest.approx(0.1) and sum(found_on[:-1]) == 0.0  # only the answer page counts
        assert sum(rewards) + final.reward == pytest.approx(1.1)


def test_demonstrations_are_real_transcripts_that_solve_the_task(env):
    for q in QUESTIONS[:3] + QUESTIONS[-3:]:
        messages = env.demonstration(q.id)
        assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "tool"] * 2 * len(q.hops) + [
            "assistant"
        ]
        assert messages[-1]["content"] == f"<answer>{q.answer}</answer>"
        assert PAGES[q.answer_page].text in messages[-2]["content"]


def test_a_wrong_or_partial_answer_scores_less_and_weights_apply():
    env = WebToolsEnv(weights={"exact": 1.0, "f1": 0.5, "found": 0.0})
    env.reset(seed=0, options={"task": "cider-prize"})
    result = env.step("<answer>Brask</answer>")
    assert result.info["reward_components"] == pytest.approx({"found": 0.0, "f1": 0.5 * 2 / 3, "exact": 0.0})
    env.reset(seed=0, options={"task": "cider-prize"})
    assert env.step("<answer>The Brask Cup</answer>").reward == pytest.approx(1.5)
    env.close()
    with pytest.raises(ConfigError, match="unknown reward component 'correct'"):
        WebToolsEnv(weights={"correct": 1.0})


def test_the_page_reward_is_paid_once_and_any_url_form_counts(env):
    env.reset(seed=0, options={"task": "capital"})
    first = env.step(call("open", url="marrow-archipelago"))  # a bare page name is read as /page/<name>
    again = env.step(call("open", url="/page/marrow-archipelago"))
    assert first.info["reward_components"]["found"] == pytest.approx(0.1)
    assert again.info["reward_components"]["found"] == 0.0


def test_bad_calls_are_observations(env):
    env.reset(seed=0)
    result = env.step(call("open", url="/page/atlantis") + call("search") + '<tool_call>{"name": "open"')
    contents = [m["content"] for m in result.observation]
    assert contents[0].startswith("Error: tool call 3: <tool_call> is never closed")
    assert contents[1] == "Error: no page at /page/atlantis; open a URL from the search results, like /page/<name>"
    assert contents[2].startswith("Error: invalid arguments for tool 'search':\n- missing required argument 'query'")
    assert not (result.terminated or result.truncated)
    assert "No results for 'zzzz'" in env.step(call("search", query="zzzz")).observation[0]["content"]


def test_the_turn_limit_truncates():
    env = WebToolsEnv(max_turns=2)
    env.reset(seed=0)
    assert not env.step(call("search", query="Ostra")).truncated
    last = env.step(call("search", query="Velm"))
    assert (last.terminated, last.truncated) == (False, True)
    assert last.info["reward_components"] == {"found": 0.0, "f1": 0.0, "exact": 0.0}
    env.close()


@pytest.mark.parametrize(
    "url", ["http://203.0.113.7/page/x", "https://example.com/", "http://localhost/page/ostra", "http://[::1]/x"]
)
def test_a_call_to_another_host_is_refused_without_any_connection_attempt(env, url):
    env.reset(seed=0)
    _SEEN.clear()
    _WATCHING.set()
    try:
        result = env.step(call("open", url=url))
    finally:
        _WATCHING.clear()
    assert result.observation[0]["content"] == (
        f"Error: {url!r} is not on this site; open a URL from the search results, like /page/<name>"
    )
    assert _SEEN == []


def test_tool_traffic_goes_to_loopback_only(env):
    env.reset(seed=0)
    _SEEN.clear()
    _WATCHING.set()
    try:
        env.step(call("search", query="Velm") + call("open", url="/page/velm"))
    finally:
        _WATCHING.clear()
    assert _SEEN and {str(t[0] if isinstance(t, tuple) else t) for t in _SEEN} == {"127.0.0.1"}


def test_splits_partition_the_questions():
    train, test = WebToolsEnv(split="train"), WebToolsEnv(split="test")
    assert len(train.tasks) + len(test.tasks) == len(QUESTIONS) and len(test.tasks) == len(QUESTIONS) // 4
    assert not {t.id for t in train.tasks} & {t.id for t in test.tasks}
    with pytest.raises(ConfigError, match="split='dev'"):
        WebToolsEnv(split="dev")


# ---------------------------------------------------------------------------------------------- contract


def test_it_passes_the_checker_with_a_solving_episode_and_gymnasium_make():
    env = WebToolsEnv()
    q = QUESTIONS[0]
    actions = [call("search", query=q.hops[0].query), call("open", url=f"/page/{q.answer_page}"),
               f"<answer>{q.answer}</answer>"]
    assert check_env(env, actions=actions) == ["types", "robustness", "seeding", "async", "outcome", "gymnasium", "close"]
    agentrl.register_plugins()
    made = gymnasium.make("agentrl/web-tools-v0")
    _, info = made.reset(seed=0)
    assert [t["function"]["name"] for t in info["tools"]] == ["search", "open"]
    made.close()


def test_the_same_seed_gives_the_same_episode_in_a_new_env_on_another_port():
    def play():
        env = WebToolsEnv()
        obs, _ = env.reset(seed=7)
        result = env.step(call("search", query=obs[1]["content"]))
        env.close()
        return obs, result

    assert repr(play()) == repr(play())


def test_close_stops_the_server_and_leaves_no_thread(env):
    before = set(threading.enumerate())
    fresh = WebToolsEnv()
    fresh.reset(seed=0)
    fresh.step(call("search", query="Velm"))
    port = fresh.server._server.server_address[1]  # type: ignore[union-attr]
    fresh.close()
    fresh.close()
    deadline = time.monotonic() + 2.0
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_the_async_api_works_from_the_callers_loop():
    async def episode():
        env = WebToolsEnv()
        await env.areset(seed=0, options={"task": "capital"})
        result = await env.astep(call("open", url="/page/marrow-archipelago"))
        final = await env.astep("<answer>Port Hadley</answer>")
        await env.aclose()
        return result, final

    result, final = asyncio.run(episode())
    assert "Its capital is Port Hadley" in result.observation[0]["content"]
    assert final.reward == pytest.approx(1.0)
