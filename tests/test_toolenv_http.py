"""agentrl.http_tools against a real loopback server that scripts 5xx answers, redirects, big and slow bodies.

Every connection attempt of the process is seen through Python's audit hooks, so "refused without any
connection attempt" is checked on the sockets themselves, not on a mock.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from agentrl.errors import ConfigError
from agentrl.http_tools import HostNotAllowedError, HTTPPolicy, HTTPToolError, check_url, fetch, http_tool
from agentrl.toolenv import ToolEnv

# ---------------------------------------------------------------------------------------------- network audit

_SEEN: list[tuple[str, object]] = []
_WATCHING = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if _WATCHING.is_set() and event in ("socket.connect", "socket.getaddrinfo"):
        _SEEN.append((event, args[1] if event == "socket.connect" else args[0]))


sys.addaudithook(_audit)


class Network:
    """Records every socket connect and DNS lookup the process makes while active."""

    def __enter__(self) -> list[tuple[str, object]]:
        _SEEN.clear()
        _WATCHING.set()
        return _SEEN

    def __exit__(self, *exc: object) -> None:
        _WATCHING.clear()


def hosts(seen: list[tuple[str, object]]) -> set[str]:
    return {str(target[0] if isinstance(target, tuple) else target) for _, target in seen}


# ---------------------------------------------------------------------------------------------- scripted server

BIG = 3_000_000


class Scripted(BaseHTTPRequestHandler):
    server: ScriptedServer

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        self.server.hits[path] += 1
        hits = self.server.hits[path]
        if path == "/ok":
            self._send(200, b"hello")
        elif path.startswith("/flaky/"):  # /flaky/<n>: 503 for the first n requests, then 200
            self._send(503 if hits <= int(path.rsplit("/", 1)[1]) else 200, f"attempt {hits}".encode())
        elif path == "/always500":
            self._send(500, b"broken")
        elif path == "/notfound":
            self._send(404, b"no such thing")
        elif path == "/redirect-local":
            self._send(302, b"", location="/ok")
        elif path == "/redirect-off":
            self._send(302, b"", location=query.get("to", ["http://203.0.113.7/steal"])[0])
        elif path == "/redirect-loop":
            self._send(302, b"", location="/redirect-loop")
        elif path == "/big":
            self._send(200, b"x" * BIG)
        elif path == "/slow":
            time.sleep(1.0)
            self._send(200, b"late")
        elif path == "/echo":
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            self._send(200, json.dumps({"method": method, "query": query, "body": body}).encode())
        else:
            self._send(404, b"unknown path")

    def _send(self, status: int, body: bytes, location: str | None = None) -> None:
        try:
            self.send_response(status)
            if location is not None:
                self.send_header("Location", location)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (size cap): expected
            self.server.cut.append(self.path)

    def log_message(self, format: str, *args: object) -> None:
        pass


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Scripted)
        self.hits: collections.Counter[str] = collections.Counter()
        self.cut: list[str] = []


@pytest.fixture
def server():
    srv = ScriptedServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    srv.host = f"127.0.0.1:{srv.server_address[1]}"  # type: ignore[attr-defined]
    srv.base = f"http://{srv.host}"  # type: ignore[attr-defined]
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def policy_for(server, **kw) -> HTTPPolicy:
    return HTTPPolicy((server.host,), **{"backoff": 0.01, "timeout": 2.0, **kw})


# ---------------------------------------------------------------------------------------------- allowlist


@pytest.mark.parametrize(
    "url",
    [
        "http://203.0.113.7/x",  # a routable-looking address outside the allowlist
        "http://example.com/",
        "http://localhost:{port}/ok",  # same machine, but not the name that was allowed
        "http://127.0.0.1:{port}@example.com/ok",  # userinfo trick: the host is example.com
        "http://127.0.0.1:1/ok",  # the allowed host on another port
        "ftp://127.0.0.1:{port}/ok",
        "file:///etc/passwd",
        "/ok",
    ],
)
def test_urls_outside_the_allowlist_are_refused_without_any_connection_attempt(server, url):
    url = url.format(port=server.server_address[1])
    with Network() as seen, pytest.raises(HostNotAllowedError):
        asyncio.run(fetch(url, policy_for(server)))
    assert seen == []
    assert sum(server.hits.values()) == 0


def test_an_allowed_url_is_fetched_over_loopback_only(server):
    with Network() as seen:
        response = asyncio.run(fetch(f"{server.base}/ok", policy_for(server)))
    assert (response.status, response.text, response.truncated) == (200, "hello", False)
    assert hosts(seen) == {"127.0.0.1"}


def test_policy_rejects_a_bare_string_and_an_empty_allowlist():
    with pytest.raises(ConfigError, match="tuple of hosts"):
        HTTPPolicy("127.0.0.1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="empty"):
        HTTPPolicy(())


def test_check_url_accepts_a_host_entry_without_a_port():
    assert str(check_url("http://127.0.0.1:9/x", HTTPPolicy(("127.0.0.1",)))) == "http://127.0.0.1:9/x"
    with pytest.raises(HostNotAllowedError, match="not allowed"):
        check_url("http://127.0.0.2:9/x", HTTPPolicy(("127.0.0.1",)))


# ---------------------------------------------------------------------------------------------- redirects


def test_an_on_host_redirect_is_followed(server):
    response = asyncio.run(fetch(f"{server.base}/redirect-local", policy_for(server)))
    assert (response.status, response.text) == (200, "hello")
    assert response.url.endswith("/ok")


@pytest.mark.parametrize("target", ["http://203.0.113.7/steal", "http://localhost:{port}/ok", "https://example.com/"])
def test_a_redirect_off_host_is_refused_before_connecting_to_its_target(server, target):
    target = target.format(port=server.server_address[1])
    with Network() as seen, pytest.raises(HostNotAllowedError, match="not allowed"):
        asyncio.run(fetch(f"{server.base}/redirect-off?to={target}", policy_for(server)))
    assert hosts(seen) == {"127.0.0.1"}  # only the allowed server was ever contacted
    assert server.hits["/redirect-off"] == 1


def test_a_redirect_loop_ends_with_a_clear_error(server):
    with pytest.raises(HTTPToolError, match="more than 3 redirects"):
        asyncio.run(fetch(f"{server.base}/redirect-loop", policy_for(server, max_redirects=3)))
    assert server.hits["/redirect-loop"] == 4


# ---------------------------------------------------------------------------------------------- retries, limits


def test_5xx_answers_are_retried_with_backoff_until_one_succeeds(server):
    started = time.perf_counter()
    response = asyncio.run(fetch(f"{server.base}/flaky/2", policy_for(server, retries=2, backoff=0.1)))
    elapsed = time.perf_counter() - started
    assert (response.status, response.text) == (200, "attempt 3")
    assert server.hits["/flaky/2"] == 3
    assert elapsed >= 0.1 + 0.2  # two backoffs: 0.1 s, then doubled


def test_persistent_5xx_fails_after_the_last_retry(server):
    with pytest.raises(HTTPToolError, match=r"failed after 3 attempt\(s\): server error 500"):
        asyncio.run(fetch(f"{server.base}/always500", policy_for(server, retries=2)))
    assert server.hits["/always500"] == 3


def test_4xx_is_an_answer_not_retried(server):
    response = asyncio.run(fetch(f"{server.base}/notfound", policy_for(server, retries=3)))
    assert (response.status, response.text) == (404, "no such thing")
    assert server.hits["/notfound"] == 1


def test_the_body_is_cut_at_the_size_cap(server):
    response = asyncio.run(fetch(f"{server.base}/big", policy_for(server, max_bytes=10_000)))
    assert response.truncated and response.text == "x" * 10_000


def test_a_slow_answer_times_out_and_is_retried(server):
    started = time.perf_counter()
    with pytest.raises(HTTPToolError, match=r"failed after 2 attempt\(s\)"):
        asyncio.run(fetch(f"{server.base}/slow", policy_for(server, timeout=0.2, retries=1)))
    assert time.perf_counter() - started < 0.9  # two 0.2 s attempts, not the server's 1 s each
    assert server.hits["/slow"] == 2


def test_proxy_settings_in_the_environment_are_ignored(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://203.0.113.9:3128")
    monkeypatch.setenv("ALL_PROXY", "http://203.0.113.9:3128")
    with Network() as seen:
        assert asyncio.run(fetch(f"{server.base}/ok", policy_for(server))).text == "hello"
    assert hosts(seen) == {"127.0.0.1"}


# ---------------------------------------------------------------------------------------------- http_tool


def test_http_tool_in_a_tool_env_sends_json_or_query_arguments(server):
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    post = http_tool("weather", f"{server.base}/echo", description="Weather for a city.", parameters=params)
    get = http_tool("lookup", f"{server.base}/echo", description="Look a city up.", parameters=params, method="GET")
    missing = http_tool("missing", f"{server.base}/notfound", description="Always 404.")
    env = ToolEnv([post, get, missing], ["Weather in Oslo?"], reward=lambda task, answer: 0.0)
    env.reset(seed=0)
    calls = (
        '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
        '<tool_call>{"name": "lookup", "arguments": {"city": "Oslo"}}</tool_call>'
        '<tool_call>{"name": "missing", "arguments": {}}</tool_call>'
    )
    obs, *_ = env.step(calls)
    env.close()
    posted, got = json.loads(obs[0]["content"]), json.loads(obs[1]["content"])
    assert posted == {"method": "POST", "query": {}, "body": '{"city":"Oslo"}'}
    assert got == {"method": "GET", "query": {"city": ["Oslo"]}, "body": ""}
    assert obs[2]["content"] == "Error: HTTPToolError: HTTP 404: no such thing"
