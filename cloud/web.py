"""The companion's small web face (stdlib http.server on a bounded pool, cloud/web_server.py):

    GET /metrics                    Prometheus text exposition (the service's dedicated registry)
    GET /fleet                      HTML table of the fleet: device, state, bundle, variant, last seen,
                                    holdout accuracy, patches, bytes in
    GET /api/fleet                  the same as JSON (plus the current bundle and table counts)

Other services add their own part of both views with `add_section(key, data, html)` (e.g. Canoe's recent
help requests and ensemble weights), so this module imports none of them.
    GET /bundles/<version>/<path>   files of a published bundle directory (claim check: the retained
                                    bundle announcement carries this URL, devices fetch and verify hashes)

Bundle files get `ETag: "<sha256>"` (the same hash as the manifest lists) and honour If-None-Match. A client
that accepts gzip gets a file gzip-compressed when that saves at least GZIP_MIN_SAVING of it (a manifest
shrinks to about a ninth, an int8 parameter delta by a fifth; compiled programs barely: sent as they are),
compressed once per file and kept in a small LRU; its ETag is "<sha256>-gzip" (another representation). Paths
are resolved inside the registered directory; '..', absolute paths, backslashes and symlinks leading out
are refused.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import html
import json
import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgepatch.protocol.topics import check_name

from .metrics import CONTENT_TYPE_LATEST, CloudMetrics
from .store import PatchStore
from .web_server import BoundedHTTPServer, OneRequestHandler

log = logging.getLogger(__name__)

SectionData = Callable[[], dict[str, Any]]
SectionHtml = Callable[[dict[str, Any]], str]  # gets the section's data; returns escaped HTML

_CONTENT_TYPES = {".json": "application/json", ".tflite": "application/octet-stream",
                  ".pte": "application/octet-stream", ".npz": "application/octet-stream",
                  ".txt": "text/plain; charset=utf-8"}
GZIP_MIN_SAVING = 0.1  # compress a file only if that saves at least this fraction of its bytes
GZIP_CACHE_FILES = 64


def accepts_gzip(header: str | None) -> bool:
    """Accept-Encoding names gzip (or *) without q=0."""
    for part in (header or "").split(","):
        token, _, params = part.strip().partition(";")
        q = params.strip().removeprefix("q=").strip() if params.strip().startswith("q=") else "1"
        try:
            weight = float(q)
        except ValueError:
            weight = 0.0
        if token.strip().lower() in ("gzip", "*") and weight > 0:
            return True
    return False


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FleetWeb:
    def __init__(self, store: PatchStore, metrics: CloudMetrics | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, public_url: str | None = None, workers: int = 8, max_idle: int = 1000,
                 idle_timeout_s: float = 30.0, request_timeout_s: float = 10.0) -> None:
        """`host`: the address to listen on (0.0.0.0 for every interface); `public_url`: the address devices
        are told (bundle URLs), e.g. https://fleet.example.com behind a proxy; default http://host:port.
        Threads, idle connections and their timeouts are bounded (cloud/web_server.py)."""
        self.store = store
        self.metrics = metrics or CloudMetrics()
        self.host = host
        self.port = port
        if public_url is not None and not public_url.startswith(("http://", "https://")):
            raise ValueError(f"public URL {public_url!r} must start with http:// or https://")
        self.public_url = public_url.rstrip("/") if public_url else None
        self.limits = {"workers": workers, "max_idle": max_idle, "idle_timeout_s": idle_timeout_s,
                       "request_timeout_s": request_timeout_s}
        self._bundles: dict[str, Path] = {}
        self._etags: dict[tuple[Path, int, int], str] = {}  # (path, mtime_ns, size) -> sha256
        self._gzip: OrderedDict[tuple[Path, int, int], bytes | None] = OrderedDict()  # LRU, see gzipped()
        self._lock = threading.Lock()
        self._server: BoundedHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sections: dict[str, tuple[SectionData, SectionHtml | None]] = {}

    # ----------------------------------------------------------------------------------------- control

    def serve_bundle(self, version: str, directory: str | Path) -> str:
        """Publish the files of `directory` under /bundles/<version>/; returns the bundle's base URL."""
        check_name(version, "bundle version")  # one URL path segment, no '..'
        d = Path(directory).resolve()
        if not d.is_dir():
            raise FileNotFoundError(f"bundle directory {directory} does not exist")
        with self._lock:
            self._bundles[version] = d
        return f"{self.url}/bundles/{version}/"

    def add_section(self, key: str, data: SectionData, html_view: SectionHtml | None = None) -> None:
        """Show another service's state: `data()` goes under `key` in /api/fleet, and `html_view(data)` (which
        must escape what it shows) is appended to /fleet. A failing provider is logged and shown as an error,
        never breaking the page."""
        if key in ("bundle", "devices", "counts", "bytes_in", "bytes_out"):
            raise ValueError(f"fleet section key {key!r} collides with a built-in field")
        with self._lock:
            self._sections[key] = (data, html_view)

    def _section_data(self) -> dict[str, Any]:
        with self._lock:
            sections = dict(self._sections)
        out: dict[str, Any] = {}
        for key, (data, _) in sections.items():
            try:
                out[key] = data()
            except Exception as exc:  # noqa: BLE001 - one broken section must not take the page down
                log.exception("fleet section %r failed", key)
                out[key] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FleetWeb already started")
        app = self

        class Handler(_Handler):
            web = app

        self._server = BoundedHTTPServer((self.host, self.port), Handler, **self.limits)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve, name="edgepatch-web", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    @property
    def url(self) -> str:
        """The address devices are told: `public_url`, else where the server listens (this machine's name when
        it listens on every interface: 0.0.0.0 is no address a device can reach)."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return self.public_url or f"http://{host}:{self.port}"

    @property
    def server(self) -> BoundedHTTPServer | None:
        return self._server

    # -------------------------------------------------------------------------------------------- views

    def fleet_json(self) -> dict[str, Any]:
        return {"bundle": self.store.latest_bundle(), "devices": self.store.devices(),
                "counts": self.store.counts(),
                "bytes_in": sum(int(d["bytes_in"]) for d in self.store.devices()),
                "bytes_out": self.metrics.value("edgepatch_bytes_out_total"), **self._section_data()}

    def fleet_html(self) -> str:
        data = self.fleet_json()
        bundle = data["bundle"]
        e = html.escape

        def when(t: float | None) -> str:
            return "" if t is None else dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

        rows = "\n".join(
            "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
                d["fleet"], d["device_id"], d["last_state"] or "", d["base_version"] or "", d["variant_id"] or "",
                when(d["last_seen"]), "" if d["holdout_acc"] is None else f"{d['holdout_acc']:.3f}",
                d["patches"], d["bytes_in"])) + "</tr>"
            for d in data["devices"])
        current = (f"{e(bundle['version'])} (manifest {e(bundle['manifest_sha256'][:12])}…)" if bundle else "none")
        with self._lock:
            sections = dict(self._sections)
        extra = []
        for key, (_, view) in sections.items():
            part = data.get(key, {})
            if isinstance(part, dict) and "error" in part and len(part) == 1:
                extra.append(f"<h2>{e(key)}</h2><p>unavailable: {e(str(part['error']))}</p>")
            elif view is not None:
                try:
                    extra.append(view(part))
                except Exception as exc:  # noqa: BLE001 - as above
                    log.exception("fleet section %r failed to render", key)
                    extra.append(f"<h2>{e(key)}</h2><p>unavailable: {e(type(exc).__name__)}</p>")
        sections_html = "\n".join(extra)
        return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgepatch fleet</title>
<style>body{{font-family:sans-serif}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style></head>
<body><h1>edgepatch fleet</h1>
<p>Current bundle: {current}. Devices: {len(data['devices'])}. Patches stored: {data['counts']['patches']}.
Bytes in: {data['bytes_in']}. Bytes out: {int(data['bytes_out'])}. Rejected messages: {data['counts']['rejects']}.
Quarantined: {data['counts']['quarantine']}.</p>
<table><thead><tr><th>fleet</th><th>device</th><th>state</th><th>bundle</th><th>variant</th><th>last seen</th>
<th>holdout acc</th><th>patches</th><th>bytes in</th></tr></thead>
<tbody>
{rows}
</tbody></table>
{sections_html}
</body></html>
"""

    def resolve_bundle_file(self, version: str, rel: str) -> Path | None:
        """The file for /bundles/<version>/<rel>, or None if unknown or outside the bundle directory."""
        with self._lock:
            base = self._bundles.get(version)
        if base is None or not rel or "\\" in rel or "\x00" in rel or rel.startswith("/"):
            return None
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts):
            return None
        target = base.joinpath(*parts).resolve()
        if not target.is_relative_to(base) or not target.is_file():
            return None
        return target

    def gzipped(self, path: Path) -> bytes | None:
        """The file gzip-compressed (deterministic: no name, no time), or None when that saves too little."""
        st = path.stat()
        key = (path, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._gzip:
                self._gzip.move_to_end(key)
                return self._gzip[key]
        raw = path.read_bytes()
        packed: bytes | None = gzip.compress(raw, compresslevel=9, mtime=0)
        if len(packed) > (1.0 - GZIP_MIN_SAVING) * len(raw):
            packed = None
        with self._lock:
            self._gzip[key] = packed
            while len(self._gzip) > GZIP_CACHE_FILES:
                self._gzip.popitem(last=False)
        return packed

    def etag(self, path: Path) -> str:
        st = path.stat()
        key = (path, st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._etags.get(key)
        if cached is None:
            cached = file_sha256(path)
            with self._lock:
                self._etags[key] = cached
        return cached


class _Handler(OneRequestHandler):
    web: FleetWeb
    server_version = "edgepatch-cloud"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, text: str) -> None:
        self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        try:
            self._route()
        except Exception:  # noqa: BLE001 - a bad request must not kill the server thread
            log.exception("error serving %s", self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")

    def _route(self) -> None:
        path = urlsplit(self.path).path
        web = self.web
        if path == "/metrics":
            web.metrics.devices_seen.set(web.store.count("devices"))
            self._send(HTTPStatus.OK, web.metrics.render(), CONTENT_TYPE_LATEST)
        elif path in ("/fleet", "/fleet/", "/"):
            self._send(HTTPStatus.OK, web.fleet_html().encode(), "text/html; charset=utf-8")
        elif path == "/api/fleet":
            self._send(HTTPStatus.OK, json.dumps(web.fleet_json()).encode(), "application/json")
        elif path.startswith("/bundles/"):
            self._bundle_file(path[len("/bundles/"):])
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {path!r}")

    def _bundle_file(self, rest: str) -> None:
        version, _, rel = unquote(rest).partition("/")
        target = self.web.resolve_bundle_file(version, rel)
        if target is None:
            self._error(HTTPStatus.NOT_FOUND, f"no file {rel!r} in bundle {version!r}")
            return
        packed = self.web.gzipped(target) if accepts_gzip(self.headers.get("Accept-Encoding")) else None
        sha = self.web.etag(target)
        etag = f'"{sha}-gzip"' if packed is not None else f'"{sha}"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = target.read_bytes() if packed is None else packed
        if self.command == "GET":
            # Counted before sending: a client that has read the body must already see it on /metrics.
            self.web.metrics.bytes_out.inc(len(body))
        headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable", "Vary": "Accept-Encoding"}
        if packed is not None:
            headers["Content-Encoding"] = "gzip"
        self._send(HTTPStatus.OK, body, _CONTENT_TYPES.get(target.suffix, "application/octet-stream"), headers)
