"""The dashboard's HTTP server: its own static page and a read-only JSON API over run directories.

Routes (GET/HEAD only):

    /                                   the page (static/index.html)
    /static/<file>                      one of the page's own files, by exact name
    /api/runs                           every run: name, path, status, counts, best
    /api/runs/<run>/evaluations?since=N records from offset N (add &format=columns for the page)
    /api/runs/<run>/best                the best search candidate with its matrices
    /api/runs/<run>/summary             progress, ETA, phase boundary, workers, summary.json

Nothing in a URL becomes a file path: static files are looked up in a fixed table built at start,
runs by the names the server gave them. When bound to loopback, requests whose Host header names
another host are refused, so a web page elsewhere cannot read runs through DNS rebinding.
"""

from __future__ import annotations

import http.server
import json
import logging
import mimetypes
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from eep.dashboard.rundata import RunView, is_run_dir, unique_names

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8266
STATIC_DIR = Path(__file__).with_name("static")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class RunSet:
    """The runs a server shows: the directories it was given, plus any that appear under roots."""

    def __init__(self, run_dirs: list[str | Path], roots: list[str | Path] = ()) -> None:
        self.roots = [Path(r) for r in roots]
        self._lock = threading.Lock()
        self._views: dict[str, RunView] = {}
        self._paths: list[Path] = []
        self._add([Path(p) for p in run_dirs])

    def _add(self, paths: list[Path]) -> None:
        new = [p for p in paths if p.resolve() not in {q.resolve() for q in self._paths}]
        if not new:
            return
        names = unique_names(self._paths + new)[len(self._paths):]
        for path, name in zip(new, names, strict=True):
            self._paths.append(path)
            self._views[name] = RunView(path, name)

    def rescan(self) -> None:
        """Pick up run directories created under the roots since the last look."""
        if not self.roots:
            return
        found = []
        for root in self.roots:
            if root.is_dir():
                found += sorted(p for p in root.iterdir() if p.is_dir() and is_run_dir(p))
        with self._lock:
            self._add(found)

    def warm(self) -> None:
        """Read every run once (in the background at start: big logs take a while to parse)."""
        for view in self.views():
            try:
                view.warm()
            except Exception:  # noqa: BLE001  (a request will report it properly)
                log.exception("dashboard: cannot read %s", view.path)

    def views(self) -> list[RunView]:
        """Every run, in the order they were given or found."""
        self.rescan()
        with self._lock:
            return list(self._views.values())

    def get(self, name: str) -> RunView | None:
        """The run the server named `name`, or None."""
        with self._lock:
            view = self._views.get(name)
        if view is None and self.roots:
            self.rescan()
            with self._lock:
                view = self._views.get(name)
        return view


def _overview(view: RunView) -> dict:
    """A run's `/api/runs` entry; a run that cannot be read is listed as such, not a 500 for all."""
    try:
        return view.overview()
    except Exception as exc:  # noqa: BLE001  (one damaged run must not hide the others)
        log.warning("dashboard: cannot read %s (%s)", view.path, exc)
        return {"name": view.name, "path": str(view.path), "status": "unreadable", "error": str(exc)[:200]}


def _static_table() -> dict[str, Path]:
    """The page's own files by URL name; only these are ever served from disk."""
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and not p.name.startswith(".")}


class DashboardHandler(http.server.BaseHTTPRequestHandler):
    """One request: a static file or a JSON answer; never a write."""

    server: DashboardServer
    server_version = "eep-dashboard"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (stdlib's name)
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:  # noqa: N802  (stdlib's naming)
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    def _refuse_method(self) -> None:
        self._send(405, {"error": "read-only: only GET and HEAD"}, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method  # noqa: N815

    # ----------------------------------------------------------------------------- routing
    def _handle(self, head: bool) -> None:
        self._head = head
        if not self._host_allowed():
            self._send(403, {"error": "unexpected Host header"})
            return
        url = urlsplit(self.path)
        parts = url.path.split("/")[1:]
        query = parse_qs(url.query)
        try:
            if url.path in ("/", "/index.html"):
                self._send_static("index.html")
            elif len(parts) == 2 and parts[0] == "static":
                self._send_static(parts[1])
            elif parts == ["api", "runs"]:
                self._send(200, [_overview(v) for v in self.server.runs.views()])
            elif len(parts) == 4 and parts[:2] == ["api", "runs"]:
                self._run_route(parts[2], parts[3], query)
            else:
                self._not_found()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away mid-answer
        except Exception:  # noqa: BLE001  (one bad request must not stop the server)
            log.exception("dashboard: %s failed", self.path)
            self._send(500, {"error": "internal error (see the server's log)"})

    def _run_route(self, name: str, what: str, query: dict[str, list[str]]) -> None:
        view = self.server.runs.get(name)
        if view is None:
            self._not_found()
        elif what == "evaluations":
            try:
                since = int(query.get("since", ["0"])[0])
                limit = int(query["limit"][0]) if "limit" in query else None
            except ValueError:
                self._send(400, {"error": "since and limit must be integers"})
                return
            if since < 0 or (limit is not None and limit < 0):
                # A negative limit would hand the poller a `next` behind its cursor.
                self._send(400, {"error": "since and limit must be >= 0"})
                return
            if query.get("format", ["records"])[0] == "columns":
                self._send_bytes(200, view.columns_json(since), "application/json", cache="no-store")
            else:
                self._send(200, view.records_since(since, limit))
        elif what == "best":
            self._send(200, view.best())
        elif what == "summary":
            self._send(200, view.summary())
        else:
            self._not_found()

    def _host_allowed(self) -> bool:
        if not self.server.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip()
        if host.startswith("["):
            host = host[1 : host.find("]")]
        elif host.count(":") == 1:
            host = host.split(":")[0]
        return host in _LOOPBACK or host == self.server.server_address[0]

    # ----------------------------------------------------------------------------- answers
    def _not_found(self) -> None:
        self._send(404, {"error": "not found"})

    def _send_static(self, name: str) -> None:
        path = self.server.static.get(name)
        if path is None:
            self._not_found()
            return
        body = path.read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        self._send_bytes(200, body, kind, cache="no-cache")

    def _send(self, code: int, data: Any, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        self._send_bytes(code, body, "application/json", cache="no-store", extra=extra)

    def _send_bytes(
        self, code: int, body: bytes, kind: str, cache: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not getattr(self, "_head", False):
            self.wfile.write(body)


class DashboardServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server holding the runs and the static file table."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, runs: RunSet, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.runs = runs
        self.static = _static_table()
        self.loopback_only = host in _LOOPBACK or host.startswith("127.")
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), DashboardHandler)

    @property
    def url(self) -> str:
        """Where a browser finds the page."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"


def make_server(
    run_dirs: list[str | Path],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    roots: list[str | Path] = (),
) -> DashboardServer:
    """A dashboard server bound to host:port (port 0: any free port), not yet serving."""
    try:
        server = DashboardServer(RunSet(run_dirs, roots), host, port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve the dashboard on {host}:{port} ({exc.strerror}); "
                      "another eep dashboard? choose another --port (0: any free one)") from exc
    threading.Thread(target=server.runs.warm, name="eep-dashboard-warm", daemon=True).start()
    return server


def start_dashboard(
    run_dirs: list[str | Path] | str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    roots: list[str | Path] = (),
) -> tuple[DashboardServer, str]:
    """Serve the dashboard from a daemon thread; returns the server (call .shutdown()) and URL."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    server = make_server(list(run_dirs), host, port, roots)
    # A short poll interval lets shutdown() return at once.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="eep-dashboard",
                              daemon=True)
    thread.start()
    return server, server.url


def dashboard_hint(run_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """One line telling a user how to watch a campaign live."""
    return f"watch it live: eep dashboard {run_dir}  ->  http://{host}:{port}"
