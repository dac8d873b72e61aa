"""On-disk store-and-forward queue for outgoing MQTT messages (stdlib sqlite3, WAL mode).

Why SQLite: one file, atomic transactions, and with WAL + synchronous=FULL a committed enqueue survives
SIGKILL and power loss without a torn queue; a half-written transaction is rolled back on the next open.

Lifecycle: `enqueue()` commits before it returns (so an id handed out is on disk) -> the link publishes
the entry -> `ack(id)` deletes it after the broker's PUBACK. Anything not acked is sent again after a
restart or reconnect (at-least-once; receivers drop duplicates by content_hash).

Entries enqueued with a `content_hash` (patches, issue 12) wait for the companion instead: the broker's
PUBACK only marks them handed over (`mark_handed`: attempt count and when to resend), and `confirm(hash)`
deletes them when the companion's application-level ack for that hash arrives. A broker's PUBACK is not
proof of storage: Mosquitto does not restore shared subscriptions from persistence, so a restart can
drop messages it had acknowledged.

Bound policy (max_entries / max_bytes): when full, evict the oldest entry of the lowest priority:
metrics first, then state/help messages, and patches only as a last resort, each eviction logged
(patch evictions at ERROR). A new retained message replaces pending retained messages on the same topic,
since a broker keeps only the latest retained message anyway.

The queue also keeps the device's persistent message sequence counter (`next_seq()`), so `seq` stays
monotonic across restarts.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepatch.protocol.topics import Channel, TopicError, parse_topic

log = logging.getLogger(__name__)

# Lower = evicted first.
PRIORITY_METRICS = 0
PRIORITY_OTHER = 1
PRIORITY_PATCH = 2
_CHANNEL_PRIORITY = {Channel.METRICS: PRIORITY_METRICS, Channel.PATCH: PRIORITY_PATCH}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    retain INTEGER NOT NULL CHECK (retain IN (0, 1)),
    priority INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    expiry_s INTEGER,
    content_hash TEXT,   -- set: kept until the companion acknowledges this hash (confirm)
    attempts INTEGER NOT NULL DEFAULT 0,  -- times the broker took it (resends included)
    next_try REAL        -- set once the broker took it: when to resend if the companion stays silent
);
CREATE INDEX IF NOT EXISTS outbox_evict ON outbox (priority, id);
CREATE INDEX IF NOT EXISTS outbox_hash ON outbox (content_hash);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(RuntimeError):
    pass


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    enqueued_at: float
    expiry_s: int | None  # MQTT 5 message expiry, counted from enqueue time
    content_hash: str | None = None  # set: waits for the companion's ack of this hash
    attempts: int = 0
    next_try: float | None = None  # None: the broker has not taken it yet

    @property
    def handed(self) -> bool:
        """The broker took it; it now waits for the companion's ack (or its resend time)."""
        return self.next_try is not None


def priority_of(topic: str) -> int:
    try:
        return _CHANNEL_PRIORITY.get(parse_topic(topic).channel, PRIORITY_OTHER)
    except TopicError:
        return PRIORITY_OTHER


class Outbox:
    def __init__(self, path: str | Path, max_entries: int = 10_000, max_bytes: int = 32 * 1024 * 1024) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.evicted: dict[int, int] = {}  # priority -> count, since open
        self._lock = threading.RLock()  # enqueue runs on the app thread, ack on paho's loop thread
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise OutboxError(f"outbox {self.path} failed its integrity check: {check}")
            self._upgrade_schema()
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc

    # ------------------------------------------------------------------------------------------ writes

    def enqueue(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None, content_hash: str | None = None) -> int:
        """Store a message durably; returns its id once it is committed to disk."""
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        if not isinstance(payload, bytes | bytearray):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) > self.max_bytes:
            raise OutboxError(f"message of {len(payload)} bytes exceeds the outbox limit {self.max_bytes}")
        priority = priority_of(topic)
        with self._lock, self._transaction() as db:
            if retain:
                db.execute("DELETE FROM outbox WHERE topic = ? AND retain = 1", (topic,))
            cur = db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, priority, enqueued_at, expiry_s, content_hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (topic, bytes(payload), qos, int(retain), priority, time.time(), expiry_s, content_hash))
            new_id = cur.lastrowid
            assert new_id is not None
            self._evict_over_limit(db)
            return new_id

    def enqueue_numbered(self, build: Callable[[int], tuple[str, bytes, str | None]], qos: int = 1,
                         retain: bool = False, expiry_s: int | None = None) -> tuple[int, int]:
        """Take the next sequence number and enqueue `build(seq)` -> (topic, payload, content hash to wait
        for or None) in ONE transaction (one fsync instead of two, and no seq is burnt if building fails).
        Returns (entry id, seq)."""
        with self._lock, self._transaction():
            seq = self.next_seq()
            topic, payload, content_hash = build(seq)
            return self.enqueue(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s,
                                content_hash=content_hash), seq

    def ack(self, entry_id: int) -> bool:
        """Delete an entry the broker acknowledged; False if it was already gone (evicted or acked)."""
        with self._lock:
            return self._db.execute("DELETE FROM outbox WHERE id = ?", (entry_id,)).rowcount == 1

    def mark_handed(self, entry_id: int, retry_after_s: float) -> bool:
        """The broker took an entry that waits for the companion: count the attempt, resend after
        `retry_after_s` unless `confirm` removes it first. False if it is already gone."""
        with self._lock:
            return self._db.execute("UPDATE outbox SET attempts = attempts + 1, next_try = ? WHERE id = ?",
                                    (time.time() + retry_after_s, entry_id)).rowcount == 1

    def confirm(self, content_hash: str) -> int:
        """The companion acknowledged `content_hash`: delete the entries waiting for it (count deleted)."""
        with self._lock:
            return self._db.execute("DELETE FROM outbox WHERE content_hash = ?", (content_hash,)).rowcount

    def unsent(self) -> int:
        """Entries the broker has not taken yet (those waiting only for the companion not counted)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE next_try IS NULL").fetchone()[0])

    def awaiting_confirmation(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE content_hash IS NOT NULL")
                       .fetchone()[0])

    def next_seq(self) -> int:
        """Next value of the persistent per-device sequence counter (starts at 0, never repeats)."""
        with self._lock, self._transaction() as db:
            row = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
            value = 0 if row is None else int(row[0]) + 1
            db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('seq', ?)", (value,))
            return value

    # ------------------------------------------------------------------------------------------- reads

    def pending(self, limit: int | None = None) -> list[OutboxEntry]:
        """Entries not yet acknowledged, oldest first."""
        sql = ("SELECT id, topic, payload, qos, retain, enqueued_at, expiry_s, content_hash, attempts, next_try "
               "FROM outbox ORDER BY id")
        with self._lock:
            rows = self._db.execute(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        return [OutboxEntry(int(r[0]), r[1], bytes(r[2]), int(r[3]), bool(r[4]), float(r[5]),
                            None if r[6] is None else int(r[6]), r[7], int(r[8]),
                            None if r[9] is None else float(r[9])) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def size_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- internals

    def _upgrade_schema(self) -> None:
        """An outbox written before issue 12 lacks the confirmation columns: add them (entries kept)."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
        if not have:
            return  # new file: _SCHEMA creates the table
        for column, decl in (("content_hash", "TEXT"), ("attempts", "INTEGER NOT NULL DEFAULT 0"),
                             ("next_try", "REAL")):
            if column not in have:
                self._db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {decl}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _evict_over_limit(self, db: sqlite3.Connection) -> None:
        while True:
            count, total = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
            if count <= self.max_entries and total <= self.max_bytes:
                return
            victim = db.execute("SELECT id, topic, priority FROM outbox ORDER BY priority, id LIMIT 1").fetchone()
            db.execute("DELETE FROM outbox WHERE id = ?", (victim[0],))
            self.evicted[victim[2]] = self.evicted.get(victim[2], 0) + 1
            level = logging.ERROR if victim[2] >= PRIORITY_PATCH else logging.WARNING
            log.log(level, "outbox %s full (%d entries, %d bytes): dropped oldest entry %d on %s",
                    self.path, count, total, victim[0], victim[1])


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception; re-entrant."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._outer = False

    def __enter__(self) -> sqlite3.Connection:
        # Nested use (under the same RLock) joins the enclosing transaction instead of failing.
        self._outer = not self._db.in_transaction
        if self._outer:
            self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self._outer:
            self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
