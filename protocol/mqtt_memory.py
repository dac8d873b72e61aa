"""The in-memory twin of an MQTT broker and client (stdlib only), for fast unit tests of every MQTT client.

`MemoryBroker` keeps what the code relies on from Mosquitto: sessions (persistent ones keep their
subscriptions, queue QoS-1 messages while the client is away, and redeliver what a manual-ack client had
not acknowledged), retained messages (a zero-length retained publish clears one), last wills (published
when a connection drops uncleanly), `$share/<group>/` subscriptions (one member of a group gets each
message) and client-id takeover. `stop()`/`start()` simulate an outage; `drop(client_id)` one lost
connection. Each `MemoryClient` runs its callbacks on a thread of its own, like paho's loop thread, so
the code under test sees the same concurrency; `settle()` waits until every client has handled everything.
Every path tested here is also tested over a real Mosquitto (the real-part twins).
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .mqtt import Incoming, MqttClient, MqttSettings, MqttVersion, PublishDone, Will
from .topics import topic_matches

RETRY_S = 0.02  # reconnect attempts while the twin broker is down


@dataclass
class _Session:
    client_id: str
    persistent: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    queued: list[tuple[str, bytes, int, bool]] = field(default_factory=list)
    unacked: dict[int, tuple[str, bytes, int]] = field(default_factory=dict)
    client: MemoryClient | None = None
    will: Will | None = None


class MemoryBroker:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, bytes] = {}
        self._mids = itertools.count(1)
        self._turn = itertools.count()
        self._clients: list[MemoryClient] = []
        self.up = True
        self.published: list[tuple[str, bytes, bool]] = []  # every publish (topic, payload, retain), for tests

    # -- test controls -------------------------------------------------------------------------------
    def stop(self, forget_shared: bool = False) -> None:
        """Outage: every connection is lost (no wills: the broker itself went away); sessions persist.
        `forget_shared`: like Mosquitto 2, the restart does not restore `$share/` subscriptions (nor what
        was queued for them), so messages published before the subscriber renews them reach nobody."""
        with self._lock:
            self.up = False
            clients = [s.client for s in self._sessions.values() if s.client is not None]
            for s in self._sessions.values():
                s.client = None
                if forget_shared and any(f.startswith("$share/") for f in s.subscriptions):
                    s.subscriptions = {f: q for f, q in s.subscriptions.items() if not f.startswith("$share/")}
                    s.queued.clear()
                    s.unacked.clear()
            # Only persistent sessions survive a broker restart (with persistence on, as in the tests' Mosquitto).
            self._sessions = {k: v for k, v in self._sessions.items() if v.persistent}
        for c in clients:
            c._lost("broker down")

    def start(self) -> None:
        with self._lock:
            self.up = True

    def drop(self, client_id: str) -> None:
        """One client's connection breaks (its will is published); it reconnects by itself."""
        with self._lock:
            session = self._sessions.get(client_id)
            client = session.client if session else None
            if session is None or client is None:
                return
            session.client = None
            self._fire_will(session)
        client._lost("connection lost")

    def retained(self, topic: str) -> bytes | None:
        with self._lock:
            return self._retained.get(topic)

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until every client's callbacks have run (nothing left in flight anywhere)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = any(c._busy for c in self._clients)
            if not busy:
                return True
            time.sleep(0.002)
        return False

    # -- used by MemoryClient ---------------------------------------------------------------------------
    def _connect(self, client: MemoryClient, will: Will | None) -> bool:
        with self._lock:
            if not self.up:
                raise ConnectionRefusedError("twin broker is down")
            s = client.settings
            old = self._sessions.get(s.client_id)
            if old is not None and old.client is not None and old.client is not client:
                # MQTT client-id takeover; the twin's loser stays off (a real pair would fight forever)
                old.client._lost("taken over by a client with the same id", reconnect=False)
            present = old is not None and s.persistent and old.persistent
            session = old if present and old is not None else _Session(s.client_id, s.persistent)
            session.client, session.will, session.persistent = client, will, s.persistent
            self._sessions[s.client_id] = session
            redeliver = list(session.unacked.items())
            session.unacked.clear()
            backlog, session.queued = session.queued, []
        for _, (topic, payload, qos) in redeliver:
            self._deliver(session, topic, payload, qos, False)
        for topic, payload, qos, retain in backlog:
            self._deliver(session, topic, payload, qos, retain)
        return present

    def _disconnect(self, client: MemoryClient) -> None:
        with self._lock:
            session = self._sessions.get(client.settings.client_id)
            if session is None or session.client is not client:
                return
            session.client = None
            if not session.persistent:
                del self._sessions[client.settings.client_id]

    def _subscribe(self, client: MemoryClient, filters: list[tuple[str, int]]) -> None:
        with self._lock:
            session = self._sessions.get(client.settings.client_id)
            if session is None or session.client is not client:
                return
            session.subscriptions.update(dict(filters))
            retained = [(t, p) for t, p in self._retained.items()
                        if any(not f.startswith("$share/") and topic_matches(f, t) for f, _ in filters)]
        for topic, payload in retained:
            self._deliver(session, topic, payload, 1, True)

    def _publish_from(self, client: MemoryClient, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """Publish on behalf of `client` if its connection is the session's live one."""
        with self._lock:
            session = self._sessions.get(client.settings.client_id)
            if not self.up or session is None or session.client is not client:
                return False
            self._publish(topic, payload, qos, retain)
            return True

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._lock:
            self.published.append((topic, payload, retain))
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            targets: list[_Session] = []
            groups: dict[str, list[_Session]] = {}
            for session in self._sessions.values():
                for f in session.subscriptions:
                    if not topic_matches(f, topic):
                        continue
                    if f.startswith("$share/"):
                        groups.setdefault(f.split("/", 2)[1] + "/" + f, []).append(session)
                    elif session not in targets:
                        targets.append(session)
            for members in groups.values():
                online = [m for m in members if m.client is not None] or members
                targets.append(online[next(self._turn) % len(online)])
        for session in targets:
            self._deliver(session, topic, payload, qos, False)

    def _deliver(self, session: _Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._lock:
            client = session.client
            if client is None:
                if session.persistent and qos > 0:
                    session.queued.append((topic, payload, qos, retain))
                return
            limit = client.settings.max_packet_bytes
            if limit is not None and client.settings.version is MqttVersion.V5 and len(payload) + len(topic) > limit:
                return  # MQTT 5 Maximum Packet Size: the broker discards what the client refused to receive
            mid = next(self._mids)
            if client.settings.manual_ack and qos > 0:
                session.unacked[mid] = (topic, payload, qos)
            message = Incoming(topic, payload, qos, retain, mid, client.connection)
            client._post(lambda: client._on_message(message))

    def _ack(self, client: MemoryClient, mid: int) -> None:
        with self._lock:
            session = self._sessions.get(client.settings.client_id)
            if session is not None:
                session.unacked.pop(mid, None)

    def _fire_will(self, session: _Session) -> None:
        if session.will is not None:
            will, session.will = session.will, None
            self._publish(will.topic, will.payload, will.qos, will.retain)


class MemoryClient(MqttClient):
    def __init__(self, settings: MqttSettings, broker: MemoryBroker) -> None:
        super().__init__(settings)
        self.broker = broker
        self._events: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._want = False
        self._will: Will | None = None
        self._offline: list[tuple[str, bytes, int, bool, PublishDone]] = []
        self._state_lock = threading.Lock()
        with broker._lock:
            broker._clients.append(self)  # settle() waits for it from now on

    def _post(self, fn: Callable[[], None]) -> None:
        with self._busy_lock:
            self._busy += 1
        self._events.put(fn)

    def _run(self) -> None:
        while (fn := self._events.get()) is not None:
            try:
                fn()
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def connect(self, will: Will | None = None) -> None:
        if self._thread is not None:
            raise RuntimeError(f"MQTT client {self.settings.client_id} already connected")
        self._want, self._will = True, will
        self._thread = threading.Thread(target=self._run, name=f"mqtt-twin-{self.settings.client_id}", daemon=True)
        self._thread.start()
        self._post(self._try_connect)

    def _try_connect(self) -> None:
        if not self._want or self.connected:
            return
        with self._state_lock:  # publishes made meanwhile wait, so the backlog keeps its order
            try:
                self.connection += 1
                present = self.broker._connect(self, self._will)
            except ConnectionRefusedError:
                timer = threading.Timer(RETRY_S, self._post, args=(self._try_connect,))
                timer.daemon = True
                timer.start()
                return
            backlog, self._offline = self._offline, []
            for topic, payload, qos, retain, done in backlog:  # QoS>0 publishes made while away, in order
                self.broker._publish(topic, payload, qos, retain)
                self._post(functools.partial(done, True, "Success"))
            self._connected.set()
        self._on_connected(present)

    def _lost(self, reason: str, reconnect: bool = True) -> None:
        self._connected.clear()  # at once: publishes from now on are queued for the next connection

        def handle() -> None:
            self._on_disconnected(reason)
            if reconnect:
                self._try_connect()
        self._post(handle)

    def disconnect(self) -> None:
        if self._thread is None:
            return
        self._want = False
        self.broker._disconnect(self)  # clean: no will
        self._post(lambda: self._on_disconnected("disconnected"))
        self._events.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        self._thread = None

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None, user_properties: Sequence[tuple[str, str]] = (),
                on_done: PublishDone | None = None) -> bool:
        if topic.startswith("$") or "+" in topic or "#" in topic:
            return False  # paho refuses these too
        with self._state_lock:
            if not (self.connected and self.broker._publish_from(self, topic, bytes(payload), qos, retain)):
                if qos == 0:
                    return False
                self._offline.append((topic, bytes(payload), qos, retain, self._track(on_done)))
                return True
        done = self._track(on_done)
        self._post(lambda: done(True, "Success"))  # the PUBACK, on the client's thread
        return True

    def ack(self, message: Incoming) -> bool:
        if not self.settings.manual_ack or message.qos == 0:
            return True
        if message.connection != self.connection or not self.connected:
            return False
        self.broker._ack(self, message.mid)
        return True

    def drop_connection(self) -> None:
        self.broker._disconnect(self)
        self._lost("dropped by the application")

    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None:
        self.broker._subscribe(self, filters)
        self._post(self._subscribed.set)
