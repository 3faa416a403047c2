"""The corpus over HTTP on loopback: ``GET /search?q=...&k=5`` (JSON) and ``GET /page/<slug>`` (text).

Standard library only (``http.server`` in a thread), so the env needs no server dependency and is
independent of whichever event loop drives it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agentrl_envs.web_tools.corpus import Page, SearchIndex

__all__ = ["CorpusServer"]

MAX_RESULTS = 10


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a client may stall before its handler thread gives up

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/search":
            self._search(parse_qs(parts.query))
        elif parts.path.startswith("/page/") and unquote(parts.path[len("/page/") :]) in self.server.pages:
            page = self.server.pages[unquote(parts.path[len("/page/") :])]
            self._send(200, f"{page.title}\n\n{page.text}\n", "text/plain; charset=utf-8")
        else:
            self._send(404, f"no page at {parts.path}; open a URL from the search results, like /page/<name>\n",
                       "text/plain; charset=utf-8")

    def _search(self, query: dict[str, list[str]]) -> None:
        text = query.get("q", [""])[0]
        try:
            k = min(max(int(query.get("k", ["5"])[0]), 1), MAX_RESULTS)
        except ValueError:
            self._send(400, "k must be a whole number\n", "text/plain; charset=utf-8")
            return
        results = [{"title": p.title, "url": p.path, "snippet": s} for p, s in self.server.index.search(text, k)]
        self._send(200, json.dumps({"query": text, "results": results}), "application/json")

    def _send(self, status: int, body: str, content_type: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # requests are not worth a log line each
        pass


class _Server(ThreadingHTTPServer):
    # Handler threads are joined by server_close(), so stop() leaves no thread behind.
    daemon_threads = False
    block_on_close = True

    def __init__(self, pages: tuple[Page, ...]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pages = {p.slug: p for p in pages}
        self.index = SearchIndex(pages)


class CorpusServer:
    """Serves ``pages`` on ``127.0.0.1`` at an ephemeral port, from :meth:`start` to :meth:`stop`.

    Attributes:
        base_url: ``http://127.0.0.1:<port>`` while running.
        host: ``127.0.0.1:<port>`` (the allowlist entry for clients).
    """

    def __init__(self, pages: tuple[Page, ...]):
        self.pages = pages
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def host(self) -> str:
        if self._server is None:
            raise RuntimeError("the corpus server is not running; call start() first")
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> CorpusServer:
        """Bind and serve in a thread; a no-op while running. Returns self."""
        if self._server is None:
            self._server = _Server(self.pages)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="agentrl-web-tools-server"
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and join every thread. Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> CorpusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
