"""The companion's web server under idle-connection floods and stalled clients (issue 12 item 3)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgepatch.cloud.metrics import CloudMetrics
from edgepatch.cloud.store import PatchStore
from edgepatch.cloud.web import FleetWeb


@pytest.fixture
def make_web(tmp_path: Path) -> Iterator:
    made: list[FleetWeb] = []
    store = PatchStore(tmp_path / "web.db")

    def make(**kw: object) -> FleetWeb:
        w = FleetWeb(store, CloudMetrics(), **kw)  # type: ignore[arg-type]
        w.start()
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()
    store.close()


def _wait(cond, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _get(web: FleetWeb, path: str = "/metrics", timeout: float = 5.0) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{web.port}{path}", timeout=timeout) as r:
        r.read()
        return r.status


def test_400_idle_connections_hold_no_threads_and_the_server_answers(make_web) -> None:  # noqa: ANN001
    web = make_web(workers=4, idle_timeout_s=60.0)
    assert _get(web) == 200  # the pool's threads exist from here on
    threads_before = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", web.port), timeout=5) for _ in range(400)]
    try:
        assert _wait(lambda: web.server.idle_connections == 400, 10), web.server.idle_connections
        assert threading.active_count() - threads_before <= 4, threading.active_count() - threads_before
        t0 = time.monotonic()
        assert _get(web, "/api/fleet") == 200
        assert time.monotonic() - t0 < 2.0
        assert threading.active_count() - threads_before <= 4  # still bounded after serving
    finally:
        for s in socks:
            s.close()


def test_idle_connections_time_out_and_are_bounded_in_number(make_web) -> None:  # noqa: ANN001
    web = make_web(workers=2, idle_timeout_s=0.5, max_idle=10)
    socks = [socket.create_connection(("127.0.0.1", web.port), timeout=5) for _ in range(20)]
    try:
        assert _wait(lambda: web.server.idle_closed >= 10, 5)
        assert web.server.idle_connections <= 10
        # The idle timeout closes every one of them; the client sees EOF.
        assert _wait(lambda: web.server.idle_connections == 0, 5)
        assert all(s.recv(1) == b"" for s in socks)
    finally:
        for s in socks:
            s.close()


def test_a_stalled_request_frees_its_worker(make_web) -> None:  # noqa: ANN001
    web = make_web(workers=1, request_timeout_s=0.5)
    stalled = socket.create_connection(("127.0.0.1", web.port), timeout=5)
    try:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        time.sleep(0.1)  # the only worker is now reading it
        t0 = time.monotonic()
        assert _get(web, timeout=5) == 200
        assert time.monotonic() - t0 < 3.0  # served once the stalled read timed out (0.5 s)
    finally:
        stalled.close()


def test_keep_alive_connection_serves_several_requests(make_web) -> None:  # noqa: ANN001
    web = make_web(workers=2)
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=5)
    for path in ("/metrics", "/api/fleet", "/nope"):
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == (404 if path == "/nope" else 200)
    conn.close()


def test_public_url_is_what_bundle_references_name(make_web, tmp_path: Path) -> None:  # noqa: ANN001
    web = make_web(host="127.0.0.1", public_url="https://fleet.example.com/edge/")
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    assert web.serve_bundle("b1", bundle) == "https://fleet.example.com/edge/bundles/b1/"
    assert _get(web, "/bundles/b1/manifest.json") == 200  # served where it listens
    with pytest.raises(ValueError, match="http"):
        FleetWeb(web.store, public_url="fleet.example.com")


def test_listening_on_every_interface_tells_devices_this_machines_name(make_web) -> None:  # noqa: ANN001
    web = make_web(host="0.0.0.0")
    assert web.url == f"http://{socket.gethostname()}:{web.port}"
    assert _get(web) == 200  # reachable on loopback too
