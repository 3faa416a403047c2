"""HTTP for tools: a guarded fetch (host allowlist, checked redirects, timeouts, retries, a size cap) and
:func:`http_tool`, which turns an HTTP endpoint into a :class:`~agentrl.tools.Tool`.

Every URL, the first and each redirect target, is checked against the allowlist *before* any connection
or DNS lookup, so a model cannot steer a tool to another host. Proxy settings from the environment are
ignored for the same reason (a proxy is a host too). httpx is imported on first use.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentrl.errors import AgentRLError, ConfigError
from agentrl.tools import Tool

__all__ = ["HTTPPolicy", "HTTPResponse", "HTTPToolError", "HostNotAllowedError", "fetch", "http_tool"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = {301, 302, 303, 307, 308}


class HTTPToolError(AgentRLError, RuntimeError):
    """A tool's HTTP request failed for good: 5xx after every retry, a transport error, too many redirects."""


class HostNotAllowedError(HTTPToolError):
    """The URL (or a redirect's target) is outside the allowlist; nothing was sent to it."""


@dataclass(frozen=True)
class HTTPPolicy:
    """What a tool may fetch, and how patiently.

    Attributes:
        allowed_hosts: ``"host"`` (any port) or ``"host:port"`` entries, e.g. ``("127.0.0.1:8123",)``.
            Names are compared as written, never resolved.
        timeout: Seconds for one attempt, from connecting to the last byte read.
        retries: Extra attempts after a 5xx answer or a transport error (4xx answers are final).
        backoff: Seconds before the first retry; doubled before each next one.
        max_bytes: The body is cut after this many bytes (and the rest never read).
        max_redirects: Redirects followed before giving up.
        schemes: URL schemes allowed.
    """

    allowed_hosts: tuple[str, ...]
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.1
    max_bytes: int = 1_000_000
    max_redirects: int = 5
    schemes: tuple[str, ...] = ("http", "https")

    def __post_init__(self) -> None:
        if isinstance(self.allowed_hosts, str):
            raise ConfigError("allowed_hosts must be a tuple of hosts, e.g. ('127.0.0.1:8000',), not a string")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))
        if not self.allowed_hosts:
            raise ConfigError("allowed_hosts is empty: name the host(s) the tool may reach, e.g. ('127.0.0.1:8000',)")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0 or self.max_bytes <= 0:
            raise ConfigError("timeout and max_bytes must be > 0, retries and backoff >= 0")


@dataclass(frozen=True)
class HTTPResponse:
    """A fetched response. ``truncated``: the body was longer than ``max_bytes`` and was cut there."""

    url: str
    status: int
    text: str
    content_type: str = ""
    truncated: bool = False


def _host_key(url: Any) -> tuple[str, str]:
    """``(host, "host:port")`` of an ``httpx.URL``, the port made explicit, IPv6 in brackets."""
    host = url.host.lower()
    shown = f"[{host}]" if ":" in host else host
    port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
    return shown, f"{shown}:{port}"


def check_url(url: str, policy: HTTPPolicy) -> Any:
    """Parse ``url`` and check it against ``policy`` without touching the network.

    Returns:
        The ``httpx.URL`` (the very object the request is sent to, so parsing cannot disagree).

    Raises:
        HostNotAllowedError: A bad scheme, no host, or a host outside the allowlist.
    """
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise HostNotAllowedError(f"invalid URL {url!r}: {exc}") from exc
    if parsed.scheme not in policy.schemes:
        raise HostNotAllowedError(f"URL {url!r}: scheme {parsed.scheme!r} is not allowed; use {policy.schemes}")
    if not parsed.host:
        raise HostNotAllowedError(f"URL {url!r} has no host; give a full URL like http://host/path")
    host, host_port = _host_key(parsed)
    if host not in policy.allowed_hosts and host_port not in policy.allowed_hosts:
        raise HostNotAllowedError(
            f"host {host_port} is not allowed (allowed: {', '.join(policy.allowed_hosts)}); nothing was sent"
        )
    return parsed


@functools.cache
def _ssl_context() -> Any:
    # Building the default context costs ~30 ms; one shared context makes a client per request cheap.
    import ssl

    return ssl.create_default_context()


async def fetch(
    url: str,
    policy: HTTPPolicy,
    *,
    method: str = "GET",
    params: Mapping[str, Any] | None = None,
    json_body: Any = None,
) -> HTTPResponse:
    """Send one request under ``policy``: allowlist, checked redirects, retries with backoff, size cap.

    A fresh client per call keeps this usable from any event loop (an env may be driven from its own loop
    thread or the caller's); with the shared SSL context that costs well under a millisecond.

    Returns:
        The final response; any status below 500 (4xx included) is returned, not raised.

    Raises:
        HostNotAllowedError: The URL or a redirect target is outside the allowlist (checked before sending).
        HTTPToolError: Still 5xx or failing after ``policy.retries`` retries, or too many redirects.
    """
    import httpx

    target = check_url(url, policy)
    async with httpx.AsyncClient(
        trust_env=False, verify=_ssl_context(), follow_redirects=False, timeout=policy.timeout
    ) as client:
        for _ in range(policy.max_redirects + 1):
            response = await _with_retries(client, method, target, policy, params, json_body)
            if response.status not in _REDIRECTS or not response.location:
                return HTTPResponse(
                    response.url, response.status, response.text, response.content_type, response.truncated
                )
            target = check_url(str(target.join(response.location)), policy)
            if response.status in (301, 302, 303) and method != "HEAD":
                method, json_body = "GET", None  # as browsers do
            params = None  # the Location already carries the query
    raise HTTPToolError(f"{url}: more than {policy.max_redirects} redirects")


@dataclass(frozen=True)
class _Attempt(HTTPResponse):
    location: str = ""


async def _with_retries(
    client: Any, method: str, url: Any, policy: HTTPPolicy, params: Any, json_body: Any
) -> _Attempt:
    import httpx

    problem = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            await asyncio.sleep(policy.backoff * 2 ** (attempt - 1))
        try:
            result = await asyncio.wait_for(
                _attempt(client, method, url, policy, params, json_body), policy.timeout
            )
        except (httpx.TransportError, asyncio.TimeoutError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else f"timed out after {policy.timeout} s"
            continue
        if result.status < 500:
            return result
        problem = f"server error {result.status}"
    attempts = policy.retries + 1
    raise HTTPToolError(f"{method} {url} failed after {attempts} attempt(s): {problem}")


async def _attempt(
    client: Any, method: str, url: Any, policy: HTTPPolicy, params: Any, json_body: Any
) -> _Attempt:
    kwargs: dict[str, Any] = {"params": params}
    if json_body is not None:
        kwargs["json"] = json_body
    async with client.stream(method, url, **kwargs) as response:
        body, truncated = bytearray(), False
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > policy.max_bytes:
                del body[policy.max_bytes :]
                truncated = True
                break  # leaving the block closes the connection; the rest is never read
        encoding = response.charset_encoding or "utf-8"
        return _Attempt(
            str(response.url),
            response.status_code,
            bytes(body).decode(encoding, errors="replace"),
            response.headers.get("content-type", ""),
            truncated,
            response.headers.get("location", ""),
        )


def http_tool(
    name: str,
    url: str,
    *,
    description: str,
    parameters: Mapping[str, Any] | None = None,
    method: str = "POST",
    policy: HTTPPolicy | None = None,
) -> Tool:
    """A tool that calls an HTTP endpoint with the model's arguments and returns the response body.

    Args:
        name: The tool's name.
        url: The endpoint. Its host is allowed by default; pass ``policy`` to set limits or more hosts.
        description: What the tool does, written for the model.
        parameters: JSON schema of the arguments (default: no arguments).
        method: ``"GET"`` sends the arguments as query parameters, anything else as a JSON body.
        policy: The fetch policy (default: the endpoint's host only, default limits).

    Returns:
        An async :class:`Tool`. Answers with status >= 400 raise, so the model sees ``Error: ...``.

    Raises:
        ConfigError: ``url`` is not a valid http(s) URL.
    """
    import httpx

    try:
        host = _host_key(httpx.URL(url))[1]
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ConfigError(f"http_tool {name!r}: invalid url {url!r}: {exc}") from exc
    guard = policy or HTTPPolicy((host,))
    check_url(url, guard)
    method = method.upper()

    async def call(**arguments: Any) -> str:
        if method == "GET":
            response = await fetch(url, guard, method=method, params=_query(arguments))
        else:
            response = await fetch(url, guard, method=method, json_body=arguments)
        if response.status >= 400:
            raise HTTPToolError(f"HTTP {response.status}: {response.text[:500]}")
        return response.text + ("\n[truncated]" if response.truncated else "")

    schema = dict(parameters or {"type": "object", "properties": {}})
    return Tool.from_schema({"name": name, "description": description, "parameters": schema}, call)


def _query(arguments: Mapping[str, Any]) -> dict[str, str | Sequence[str]]:
    """Query parameters: strings as is, lists as repeated keys, anything else as JSON."""
    out: dict[str, str | Sequence[str]] = {}
    for key, value in arguments.items():
        if isinstance(value, list):
            out[key] = [v if isinstance(v, str) else json.dumps(v) for v in value]
        else:
            out[key] = value if isinstance(value, str) else json.dumps(value)
    return out
