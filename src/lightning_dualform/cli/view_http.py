"""The viewer's HTTP side: the server bound to loopback, its routes to :class:`~.view.ViewApp`'s answers, the
assets it serves (a fixed table of files), and the one error a request gets: 400 with a one-line reason."""

from __future__ import annotations

import json
import logging
import os
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlsplit

from lightning_dualform.cli.inputs import UsageError, error_message
from lightning_dualform.errors import StoreError

if TYPE_CHECKING:
    from lightning_dualform.cli.view import ViewApp

log = logging.getLogger("lightning_dualform.cli.view")

HOST = "127.0.0.1"
DEFAULT_PORT = 8765
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "view_assets")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
#: uploads larger than this are refused (a few thousand query rows of an MNIST-sized layer)
MAX_UPLOAD_BYTES = 32 * 2**20


class BadRequest(Exception):
    """A request the viewer refuses with HTTP 400 and a one-line reason."""


def asset_table(folder: str = ASSETS) -> dict[str, str]:
    """``{url path: file}`` of the files the viewer serves: the regular files directly in ``folder`` with a
    known type, fixed when the server starts."""
    table = {}
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if os.path.isfile(full) and not os.path.islink(full) and os.path.splitext(name)[1] in _TYPES:
            table["/" + name] = full
    table["/"] = table.get("/index.html", "")
    return table


def make_handler(app: ViewApp, assets: dict[str, str]) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, Callable[[dict[str, list[str]]], dict[str, Any]]] = {
        "/api/info": app.info, "/api/queries": app.queries, "/api/attend": app.attend, "/api/images": app.images,
        "/api/cache": app.cache, "/api/influence": app.influence, "/api/study": app.study,
    }

    class Handler(BaseHTTPRequestHandler):
        server_version = "lightning-dualform-view"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # through logging, not stderr
            log.debug("%s %s", self.address_string(), fmt % args)

        def _host_ok(self) -> bool:
            port = self.server.server_address[1]  # type: ignore[index]  # (an AF_INET server: (host, port))
            hosts = self.headers.get_all("Host") or []  # every one: a second Host header is not looked past
            return len(hosts) == 1 and hosts[0] in (f"{HOST}:{port}", f"localhost:{port}")

        def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data, allow_nan=True).encode(), "application/json")

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": " ".join(str(message).split())})

        def _guard(self) -> tuple[str, dict[str, list[str]]] | None:
            if not self._host_ok():
                hosts = self.headers.get_all("Host") or []
                shown = ", ".join(repr(h[:60]) for h in hosts[:3]) or "none"
                self._error(HTTPStatus.FORBIDDEN, f"requests must carry one Host header, {HOST}:PORT or "
                            f"localhost:PORT; this one has {len(hosts)}: {shown}.")
                return None
            parts = urlsplit(self.path)
            try:
                params = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query),
                                  max_num_fields=64)
            except ValueError as err:
                self._error(HTTPStatus.BAD_REQUEST, f"malformed query string ({err}).")
                return None
            return parts.path, params

        def _answer(self, fn: Callable[[], Any]) -> None:
            t0 = time.perf_counter()
            try:
                data = fn()
            except (BadRequest, UsageError, ValueError, KeyError, TypeError) as err:
                self._error(HTTPStatus.BAD_REQUEST, error_message(err))
                return
            except StoreError as err:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, error_message(err))
                return
            except Exception as err:  # a bug: one line for the page, the traceback for --debug
                log.exception("request %s failed", self.path)
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {error_message(err)}")
                return
            self._json(HTTPStatus.OK, data)
            log.debug("%s answered in %.1f ms", self.path, 1e3 * (time.perf_counter() - t0))

        def do_GET(self) -> None:
            got = self._guard()
            if got is None:
                return
            path, params = got
            if path in routes:
                self._answer(lambda: routes[path](params))
                return
            if path in assets and assets[path]:
                if params:
                    self._error(HTTPStatus.BAD_REQUEST, f"{path} takes no parameters.")
                    return
                with open(assets[path], "rb") as fh:
                    body = fh.read()
                extra = {}
                if path in ("/", "/index.html"):  # the page runs its own script and style only
                    extra["Content-Security-Policy"] = (
                        "default-src 'none'; script-src 'self'; style-src 'self'; "
                        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'")
                self._send(HTTPStatus.OK, body, _TYPES[os.path.splitext(assets[path])[1]], extra)
                return
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {path[:100]}")

        do_HEAD = do_GET

        def do_POST(self) -> None:
            got = self._guard()
            if got is None:
                return
            path, params = got
            if path != "/api/upload":
                self._error(HTTPStatus.METHOD_NOT_ALLOWED if path in routes or path in assets else HTTPStatus.NOT_FOUND,
                            f"POST {path[:100]}: only /api/upload takes POST.")
                return
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._error(HTTPStatus.LENGTH_REQUIRED, "POST /api/upload needs a Content-Length.")
                return
            if size > MAX_UPLOAD_BYTES or size < 0:
                self.close_connection = True
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"uploads may hold at most {MAX_UPLOAD_BYTES // 2**20} MiB.")
                return
            body = self.rfile.read(size)
            self._answer(lambda: app.upload(params, body))

        def _not_allowed(self) -> None:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED,
                        f"{self.command} is not supported; use GET (POST for /api/upload).")

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    return Handler


class ViewServer(ThreadingHTTPServer):
    """The viewer's HTTP server, bound to 127.0.0.1."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: ViewApp, port: int = 0, assets: str = ASSETS) -> None:
        super().__init__((HOST, port), make_handler(app, asset_table(assets)))
        self.app = app

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"
