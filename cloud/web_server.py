"""An HTTP server whose threads and idle connections are bounded (issue 12: 400 idle connections held 400
threads of the stdlib ThreadingHTTPServer, with no timeout).

One selector thread owns every connection that is waiting for a request; a connection goes to the worker
pool (`workers` threads) only once bytes have arrived, a worker serves ONE request and hands a keep-alive
connection back to the selector instead of blocking on it. So:
  * idle connections cost a file descriptor, not a thread; at most `max_idle` are kept (the oldest idle one
    is closed to make room) and each is closed after `idle_timeout_s` without a request;
  * a request must arrive within `request_timeout_s` per read once it has started (a socket timeout), so
    a client that stops mid-request frees its worker;
  * `workers` bounds concurrent requests; more wait in the pool's queue.
Known limit: a client trickling one byte per `request_timeout_s` keeps one worker busy for as long as it
keeps trickling (the stdlib parser has no whole-request deadline); it cannot take more than one worker.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

log = logging.getLogger(__name__)


class OneRequestHandler(BaseHTTPRequestHandler):
    """Serves one request per dispatch; says whether the connection may be kept for another one."""

    keep: bool = False

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        self.keep = not self.close_connection


class BoundedHTTPServer(HTTPServer):
    request_queue_size = 512  # listen backlog: a burst of connects is queued, not dropped (stdlib: 5)

    def __init__(self, address: tuple[str, int], handler: type[OneRequestHandler], *, workers: int = 8,
                 max_idle: int = 1000, idle_timeout_s: float = 30.0, request_timeout_s: float = 10.0) -> None:
        if workers < 1 or max_idle < 1 or idle_timeout_s <= 0 or request_timeout_s <= 0:
            raise ValueError("workers and max_idle must be >= 1, timeouts > 0")
        super().__init__(address, handler)
        self.socket.setblocking(False)  # accept everything queued on each wake-up, never block on accept
        self.workers, self.max_idle = workers, max_idle
        self.idle_timeout_s, self.request_timeout_s = idle_timeout_s, request_timeout_s
        self.idle_closed = 0  # connections closed for idling too long or to make room
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="edgepatch-web-worker")
        self._sel = selectors.DefaultSelector()
        self._idle: dict[socket.socket, tuple[float, Any]] = {}  # insertion order = oldest first
        self._back: queue.SimpleQueue[tuple[socket.socket, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def serve(self) -> None:
        """The selector loop (run it on one thread); returns after `stop()`."""
        self._sel.register(self.socket, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in self._sel.select(timeout=min(1.0, self.idle_timeout_s / 2)):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        self._dispatch(key.fileobj)  # type: ignore[arg-type]
                while True:
                    try:
                        conn, addr = self._back.get_nowait()
                    except queue.Empty:
                        break
                    self._park(conn, addr)
                self._expire()
        finally:
            for conn in list(self._idle):
                self._drop(conn)
            self._stopped.set()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._stopped.wait(5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self.server_close()

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self.socket.accept()
            except BlockingIOError:  # none left
                return
            except OSError as exc:  # out of file descriptors: free one (the oldest idle) rather than spin
                log.warning("accept failed: %s", exc)
                if self._idle:
                    self._drop(next(iter(self._idle)))
                    self.idle_closed += 1
                return
            conn.setblocking(True)
            self._park(conn, addr)

    def _park(self, conn: socket.socket, addr: Any) -> None:
        if self._stopping.is_set():
            conn.close()
            return
        while len(self._idle) >= self.max_idle:  # make room: the oldest idle connection goes
            self._drop(next(iter(self._idle)))
            self.idle_closed += 1
        self._idle[conn] = (time.monotonic(), addr)
        self._sel.register(conn, selectors.EVENT_READ, addr)

    def _drop(self, conn: socket.socket) -> None:
        self._idle.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn)
        self.shutdown_request(conn)

    def _dispatch(self, conn: socket.socket) -> None:
        _, addr = self._idle.pop(conn)
        self._sel.unregister(conn)
        self._pool.submit(self._serve_one, conn, addr)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout_s
        for conn, (since, _) in list(self._idle.items()):
            if since >= cutoff:
                break  # insertion order: the rest are younger
            self._drop(conn)
            self.idle_closed += 1

    def _serve_one(self, conn: socket.socket, addr: Any) -> None:
        keep = False
        try:
            conn.settimeout(self.request_timeout_s)
            handler = self.RequestHandlerClass(conn, addr, self)
            keep = bool(getattr(handler, "keep", False))
        except Exception:  # noqa: BLE001 - a broken connection must not take a worker down
            log.debug("connection from %s failed", addr, exc_info=True)
        if keep and not self._stopping.is_set():
            self._back.put((conn, addr))
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        else:
            self.shutdown_request(conn)
