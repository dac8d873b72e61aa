"""Cloud ingest: MQTT subscriber that validates, dedupes and stores device messages, acking AFTER commit.

Subscribes (QoS 1) to `edgepatch/v1/<fleet>/+/{patch,metrics,state,lwt}`; `fleet` may be '+' for all fleets.
With MQTT 5 the filters are shared subscriptions (`$share/<group>/...`), so several workers with the same
group split the stream; with 3.1.1 they are plain subscriptions (one worker). The protocol is a setting on
one code path (`MqttVersion`). `python -m edgepatch.cloud.ingest` runs one worker (cloud/ingest_main.py).

Delivery guarantee ("every acknowledged patch is in the store, no duplicates"):
  * the MQTT client (the seam in protocol/mqtt.py) runs with `manual_ack`: a QoS-1 PUBLISH is PUBACKed
    only after the transaction holding it has committed (SQLite WAL + synchronous=FULL, or PostgreSQL).
  * the session is persistent (fixed client id; MQTT 5 clean_start=False + session expiry, 3.1.1
    clean_session=False), so after a crash or a lost connection the broker redelivers every message we had
    not acknowledged, and keeps queueing new ones while we are away.
  * redeliveries are harmless: patches (and metrics) are unique by content hash in the store.
  * after the commit and before the PUBACKs, each device gets a PatchAck naming its patches' content hashes
    on `<device>/ack` (cloud/ingest_acks.py): devices keep a patch until then, since a broker's PUBACK is
    no proof of storage (Mosquitto does not restore MQTT 5 shared subscriptions after a restart).
  * acks are only sent on the connection the message arrived on (the seam refuses the others): packet ids
    are per connection, and acking an old id on a new connection could acknowledge a different message.

Throughput: messages are batched - one transaction (one fsync) per batch, then the batch's PUBACKs. A batch
is flushed when it reaches `max_batch`, when its oldest message is `max_delay_s` old, when the broker's
in-flight window is full (it will send no more until we ack) or when the socket has been quiet for
`linger_s`. Messages are validated on the client's thread and queued; the ingest loop batches them and
sends the acks. A batch never exceeds `max_batch` and the arrival queue is bounded (the broker's in-flight
window + 4 `max_batch`), so under overload the broker holds the backlog and memory stays flat (nothing is
dropped: what we never acknowledged the broker redelivers); the commit itself runs on a writer thread (one batch in flight), so the fsync of batch N
overlaps receiving and validating batch N+1. A failed commit drops the connection, so the broker
redelivers the batch (the store dedupes what was stored after all) - but only when the database itself
failed (connection lost, locked): a batch the database refuses for its rows' sake (a value a column will
not hold) is retried row by row, the refused rows go to the `quarantine` table with the database's reason
and everything is acknowledged, so one poison message never stalls the stream (issue 12).

Bad messages never crash the loop: each is logged with its `MessageError.reason` (or the admission
reason of `policy`, cloud/ingest_policy.py: unknown device, unknown base version, wrong φ size), counted in
`edgepatch_ingest_rejects_total{reason}`, written to the `rejects` table and acknowledged (otherwise the
broker would redeliver it forever). A zero-length retained publish on `state`/`lwt` is a device clearing its
retained will, not an error: it is acknowledged and ignored.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgepatch.protocol.messages import Message, MessageError, decode
from edgepatch.protocol.mqtt import Incoming, MqttClient, make_client
from edgepatch.protocol.topics import Channel
from edgepatch.protocol.wire import known_kinds

from .ingest_acks import patch_acks, publish_acks
from .ingest_settings import INGEST_CHANNELS, IngestSettings  # noqa: F401 - re-exported: callers import them here
from .metrics import CloudMetrics
from .store import BatchResult, PatchStore, Received, Reject

if TYPE_CHECKING:
    from .ingest_policy import IngestPolicy

log = logging.getLogger(__name__)

PatchHook = Callable[[Message], None]


@dataclass
class IngestStats:
    accepted: int = 0
    new_patches: int = 0
    duplicates: int = 0
    rejected: int = 0
    cleared: int = 0
    batches: int = 0
    acked: int = 0
    commit_failures: int = 0
    quarantined: int = 0  # accepted, but the database refused them: in the quarantine table
    app_acks: int = 0  # patch acks handed to the client for the devices (cloud/ingest_acks.py)
    connects: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Pending:
    incoming: Incoming
    item: Received | Reject | None  # None: acknowledged and ignored (a cleared retained will)


InFlight = tuple[Future[tuple[BatchResult, float]], list[_Pending], list[Received], list[Reject]]


class IngestService:
    def __init__(self, store: PatchStore, settings: IngestSettings | None = None, *,
                 metrics: CloudMetrics | None = None, client: MqttClient | None = None,
                 policy: IngestPolicy | None = None) -> None:
        self.store = store
        self.policy = policy  # admission after validation (cloud/ingest_policy.py): devices, base, φ size
        self.settings = settings or IngestSettings()
        self.metrics = metrics or CloudMetrics()
        self.stats = IngestStats()
        self.on_patch: list[PatchHook] = []  # called after commit with each NEW patch (not duplicates)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Validated on the client's thread. The broker should send at most `receive_maximum` unacknowledged
        # messages (MQTT 5), but Mosquitto 2.0 overshoots it on shared subscriptions (a 20,000-message backlog
        # filled a receive_maximum + max_batch queue); the bound is the backstop: a full queue holds the
        # client's thread, so the broker keeps the backlog and our memory stays flat. Generous, since while
        # that thread waits it also sends nothing (PatchAcks, PUBACKs, keepalive pings wait behind it).
        # SimpleQueue (C, lock-free for us) with the bound checked before each put: queue.Queue's condition
        # variables cost ~10 µs a message at fleet load.
        self._arrivals: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self.arrival_bound = max(self.settings.receive_maximum, self.settings.inflight_window) + 4 * self.settings.max_batch
        self._dropping = False  # set while a failed commit drops the connection: arrivals are then let go
        self._pending: list[_Pending] = []
        self._in_flight: InFlight | None = None
        self._writer = ThreadPoolExecutor(max_workers=1)
        self._oldest = 0.0
        self._known_devices = {(d["fleet"], d["device_id"]) for d in store.devices()}
        self.metrics.devices_seen.set(len(self._known_devices))
        known_kinds()  # the payload families' imports at start-up, not inside the first message's decode
        self.client = client or make_client(self.settings.mqtt())
        self.client.connect_hooks.append(self._on_connect)
        for topic_filter in self.settings.topic_filters():
            self.client.subscribe(topic_filter, self._on_message)

    def add_patch_hook(self, hook: PatchHook) -> None:
        self.on_patch.append(hook)

    # -------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Run the ingest loop on a background thread."""
        if self._thread is not None:
            raise RuntimeError("IngestService already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name="edgepatch-ingest", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask `run_forever` to commit, acknowledge and return (safe from a signal handler)."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Commit and acknowledge what is pending, disconnect, join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"ingest thread did not stop within {timeout} s")
            self._thread = None

    def wait_subscribed(self, timeout: float) -> bool:
        return self.client.wait_subscribed(timeout)

    @property
    def connected(self) -> bool:
        return self.client.connected

    def run_forever(self) -> None:
        """Process messages until `stop()` (or SIGTERM in `main`). The client reconnects by itself."""
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgepatch-ingest-commit")
        self.client.connect()
        try:
            while not self._stop.is_set():
                if len(self._pending) >= self.settings.max_batch and self._in_flight is not None:
                    # Full batch waiting behind the commit: take nothing more (the bounded arrival queue
                    # then holds the client's thread, so the broker stops sending: backpressure).
                    futures_wait([self._in_flight[0]], timeout=0.1)
                    quiet = False
                else:
                    quiet = self._receive(self._wait_time())
                self._poll_commit()
                if self._pending and self._in_flight is None and self._flush_due(quiet):
                    self._flush()
        finally:
            self._stop.set()  # also on an error: a client thread waiting on the full queue must let go
            self._poll_commit(wait=True)
            self._flush()
            self._poll_commit(wait=True)
            self.client.disconnect()
            self._writer.shutdown(wait=True)

    def _receive(self, timeout: float) -> bool:
        """Move arrivals into the pending batch, never past `max_batch` (waiting up to `timeout` for the
        first); True if none came."""
        room = self.settings.max_batch - len(self._pending)
        try:
            first = self._arrivals.get(timeout=timeout) if timeout > 0 else self._arrivals.get_nowait()
        except queue.Empty:
            return True
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append(first)
        for _ in range(room - 1):
            try:
                self._pending.append(self._arrivals.get_nowait())
            except queue.Empty:
                break
        return False

    def _wait_time(self) -> float:
        if self._in_flight is not None:
            return 0.001  # poll the commit's completion; an arrival wakes us earlier
        if not self._pending:
            return 0.1
        age_left = self.settings.max_delay_s - (time.monotonic() - self._oldest)
        return max(0.0, min(self.settings.linger_s, age_left))

    def _flush_due(self, quiet: bool) -> bool:
        s = self.settings
        n = len(self._pending)
        return (quiet or n >= s.max_batch or n >= s.inflight_window
                or time.monotonic() - self._oldest >= s.max_delay_s)

    # ------------------------------------------------------------------------- client callbacks (its thread)

    def _on_connect(self, session_present: bool) -> None:
        self.stats.connects += 1
        log.info("ingest %s connected (session present: %s)", self.settings.resolved_client_id, session_present)

    def _on_message(self, msg: Incoming) -> None:
        # Never raise: a bug here must not leave a message unacknowledged forever.
        now = time.time()
        item: Received | Reject | None
        try:
            try:
                message = decode(msg.topic, msg.payload, max_bytes=self.settings.max_message_bytes)
                refusal = self.policy.admit(message) if self.policy is not None else None
                item = (Received(message, len(msg.payload), now, raw=bytes(msg.payload)) if refusal is None
                        else self._reject(refusal[0], msg.topic, refusal[1], now, msg.payload))
            except MessageError as exc:
                if exc.reason == "empty" and msg.topic.rsplit("/", 1)[-1] in (Channel.STATE, Channel.LWT):
                    item = None
                else:
                    item = self._reject(exc.reason, msg.topic, exc.text, now, msg.payload)
        except Exception as exc:  # noqa: BLE001 - defensive: decode() should only raise MessageError
            log.exception("unexpected error validating a message on %r", msg.topic)
            item = self._reject("bad_field", msg.topic, f"internal error: {exc!r}", now, msg.payload)
        # Bounded: a full queue holds this (the client's) thread, so no more is read from the broker.
        while self._arrivals.qsize() >= self.arrival_bound:
            if self._stop.is_set() or self._dropping or msg.connection != self.client.connection:
                return  # never acknowledged, so the broker redelivers it (and the device's outbox resends it)
            time.sleep(0.002)
        self._arrivals.put(_Pending(msg, item))

    def _reject(self, reason: str, topic: str, text: str, now: float, payload: bytes = b"") -> Reject:
        log.warning("reject reason=%s topic=%s detail=%s", reason, topic, text[:200],
                    extra={"event": "reject", "reason": reason, "topic": topic})
        return Reject.of(reason, str(topic), text, now, payload)  # keeps a prefix, sha256 and size only

    # ------------------------------------------------------------------------------------------ commit

    def _flush(self) -> None:
        """Hand the pending batch to the writer thread (one commit in flight, so acks stay in order)."""
        if not self._pending:
            return
        if self._in_flight is not None:
            self._poll_commit(wait=True)
        batch, self._pending = self._pending, []
        accepted = [p.item for p in batch if isinstance(p.item, Received)]
        rejects = [p.item for p in batch if isinstance(p.item, Reject)]
        self._in_flight = (self._writer.submit(self._timed_commit, accepted, rejects), batch, accepted, rejects)
        if not self.settings.overlap_commit:
            self._poll_commit(wait=True)

    def _timed_commit(self, accepted: list[Received], rejects: list[Reject]) -> tuple[BatchResult, float]:
        t0 = time.perf_counter()
        result = self.store.commit_or_quarantine(accepted, rejects)  # poison rows quarantined, not retried
        return result, time.perf_counter() - t0

    def _poll_commit(self, wait: bool = False) -> None:
        if self._in_flight is None:
            return
        future, batch, accepted, rejects = self._in_flight
        if not wait and not future.done():
            return
        self._in_flight = None
        try:
            result, seconds = future.result()
        except Exception:
            # Nothing acknowledged: drop the connection so the broker redelivers the batch on reconnect.
            self.stats.commit_failures += 1
            log.exception("committing a batch of %d messages failed; reconnecting for redelivery", len(batch))
            if not self._stop.is_set():
                self._dropping = True  # a client thread blocked on the full queue lets go, so the drop can join it
                try:
                    self.client.drop_connection()
                finally:
                    self._dropping = False
                self._stop.wait(self.settings.reconnect_min_delay)
            return
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.batch_size.observe(len(batch))
        if self.settings.app_acks:  # tell the devices what is stored, before PUBACKs let the broker forget it
            acks = patch_acks(((p.incoming, p.item) for p in batch), result, self.settings.max_message_bytes)
            self.stats.app_acks += publish_acks(self.client, acks)
        # Committed: now, and only now, acknowledge (the seam refuses acks of an older connection).
        for p in batch:
            if p.incoming.qos > 0 and self.client.ack(p.incoming):
                self.stats.acked += 1
        self._account(batch, accepted, rejects, result.duplicates, result.new_patches)
        if result.quarantined:  # stored in `quarantine` and acknowledged above: never redelivered
            self.stats.quarantined += len(result.quarantined)
            self.metrics.rejects.labels(reason="quarantined").inc(len(result.quarantined))

    def _account(self, batch: list[_Pending], accepted: list[Received], rejects: list[Reject],
                 duplicates: int, new_patches: list[Message]) -> None:
        m, s = self.metrics, self.stats
        s.batches += 1
        s.accepted += len(accepted)
        s.duplicates += duplicates
        s.new_patches += len(new_patches)
        s.rejected += len(rejects)
        s.cleared += sum(1 for p in batch if p.item is None)
        for r in rejects:
            m.rejects.labels(reason=r.reason).inc()
            s.reject_reasons[r.reason] = s.reject_reasons.get(r.reason, 0) + 1
        kinds: dict[str, int] = {}  # counters incremented once per batch, not per message
        nbytes = 0
        for a in accepted:
            kinds[a.message.kind] = kinds.get(a.message.kind, 0) + 1
            nbytes += a.nbytes
            self._known_devices.add((a.message.fleet, a.message.device_id))
        for kind, n in kinds.items():
            m.messages.labels(kind=kind).inc(n)
        m.bytes_in.inc(nbytes)
        if duplicates:
            m.duplicates.inc(duplicates)
        m.devices_seen.set(len(self._known_devices))
        for msg in new_patches:
            for hook in self.on_patch:
                try:
                    hook(msg)
                except Exception:  # noqa: BLE001 - a companion hook must not stop ingest
                    log.exception("on_patch hook %r failed for %s", hook, msg.content_hash[:12])


def main(argv: list[str] | None = None) -> int:
    """`python -m edgepatch.cloud.ingest` (see cloud/ingest_main.py)."""
    from .ingest_main import main as run

    return run(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
