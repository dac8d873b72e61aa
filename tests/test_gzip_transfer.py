"""Bundle files travel gzip-compressed when that pays (cloud/web.py), and a device inflates them within the
size it expects (protocol/blobs.py): a gzip bomb, a corrupt or truncated body, trailing bytes, and an
encoding the client did not ask for are refused with a clear error. Real servers on loopback."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgepatch.cloud.store import PatchStore, sqlite_url
from edgepatch.cloud.web import FleetWeb, accepts_gzip
from edgepatch.protocol.blobs import BlobError, Wire, fetch_bytes, fetch_to_file


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[FleetWeb, str, Path]]:
    files = tmp_path / "bundle"
    files.mkdir()
    manifest = {"artifacts": {f"a{i}": {"path": f"a{i}.bin", "sha256": f"{i:064x}", "bytes": i} for i in range(200)}}
    (files / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (files / "noise.bin").write_bytes(np.random.default_rng(0).bytes(50_000))  # does not compress
    store = PatchStore(sqlite_url(tmp_path / "s.sqlite"))
    web = FleetWeb(store)
    web.start()
    try:
        yield web, web.serve_bundle("v1", files), files
    finally:
        web.stop()
        store.close()


def test_compressible_files_travel_gzipped_and_arrive_exact(served: tuple[FleetWeb, str, Path], tmp_path: Path
                                                            ) -> None:
    web, url, files = served
    raw = (files / "manifest.json").read_bytes()
    wire = Wire()
    got = fetch_to_file(url + "manifest.json", tmp_path / "m.json", max_bytes=len(raw), allow_file=False,
                        accept_gzip=True, wire=wire)
    assert got == len(raw) and (tmp_path / "m.json").read_bytes() == raw
    assert 0 < wire.bytes < 0.25 * len(raw)
    before = web.metrics.value("edgepatch_bytes_out_total")
    plain = Wire()  # a client that does not ask for gzip gets the file as it is
    assert fetch_bytes(url + "manifest.json", max_bytes=len(raw), accept_gzip=False, wire=plain) == raw
    assert plain.bytes == len(raw)
    assert web.metrics.value("edgepatch_bytes_out_total") - before == len(raw)  # the server counts wire bytes
    noise = Wire()  # incompressible: sent as it is even to a gzip client
    assert fetch_bytes(url + "noise.bin", max_bytes=50_000, accept_gzip=True, wire=noise) == (
        files / "noise.bin").read_bytes()
    assert noise.bytes == 50_000


def test_gzip_etag_is_its_own_representation(served: tuple[FleetWeb, str, Path]) -> None:
    _, url, _ = served
    with urllib.request.urlopen(urllib.request.Request(url + "manifest.json",
                                                       headers={"Accept-Encoding": "gzip"})) as resp:
        etag, encoding, vary = resp.headers["ETag"], resp.headers["Content-Encoding"], resp.headers["Vary"]
    assert encoding == "gzip" and etag.endswith('-gzip"') and vary == "Accept-Encoding"
    req = urllib.request.Request(url + "manifest.json", headers={"Accept-Encoding": "gzip", "If-None-Match": etag})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req)
    assert exc.value.code == 304


@pytest.mark.parametrize("header, expected", [
    (None, False), ("", False), ("gzip", True), ("deflate, gzip;q=0.5", True), ("gzip;q=0", False),
    ("*", True), ("identity", False), ("GZIP", True), ("gzip;q=zero", False)])
def test_accept_encoding_parsing(header: str | None, expected: bool) -> None:
    assert accepts_gzip(header) is expected


class _Evil(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the body and Content-Encoding the path names."""

    bodies: dict[str, tuple[bytes, str]] = {}

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        body, encoding = self.bodies[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Encoding", encoding)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def evil() -> Iterator[str]:
    good = gzip.compress(b"x" * 1000)
    _Evil.bodies = {
        "/bomb": (gzip.compress(b"\0" * (64 << 20)), "gzip"),  # 64 MiB of zeros in ~64 kB
        "/corrupt": (good[:10] + b"\xff" * 20 + good[30:], "gzip"),
        "/truncated": (good[: len(good) // 2], "gzip"),
        "/trailing": (good + b"junk", "gzip"),
        "/brotli": (b"x" * 10, "br"),
        "/good": (good, "gzip"),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Evil)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path, accept, message", [
    ("/bomb", True, "larger than the 1048576 bytes"),
    ("/corrupt", True, "corrupt gzip body"),
    ("/truncated", True, "ends early"),
    ("/trailing", True, "data after the end"),
    ("/brotli", True, "'br' was not asked for"),
    ("/good", False, "'gzip' was not asked for"),
])
def test_bad_gzip_bodies_are_refused(evil: str, path: str, accept: bool, message: str) -> None:
    with pytest.raises(BlobError, match=message):
        fetch_bytes(evil + path, max_bytes=1 << 20, accept_gzip=accept)


def test_a_bomb_is_refused_after_reading_little(evil: str) -> None:
    wire = Wire()
    with pytest.raises(BlobError):
        fetch_bytes(evil + "/bomb", max_bytes=1 << 20, accept_gzip=True, wire=wire)
    assert wire.bytes < 64 << 10  # stopped once the bound was passed, not after inflating 64 MiB
    assert fetch_bytes(evil + "/good", max_bytes=1000, accept_gzip=True) == b"x" * 1000
