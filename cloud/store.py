"""The cloud's patch store (SQLAlchemy 2.x core): SQLite by default, PostgreSQL by URL.

Tables (names get an optional prefix so test runs on a shared PostgreSQL never clash):

    devices   one row per (fleet, device_id): first/last seen, last state, bundle/variant, bytes in,
              last holdout accuracy
    patches   every distinct PatchUpdate; `content_hash` UNIQUE is the idempotency key, so a message
              redelivered after a crash or a lost PUBACK is stored once, even with concurrent workers
    metrics   device scalar metrics; UNIQUE (content_hash, name) makes redelivery harmless here too
    bundles   published bundle versions (manifest sha, where they are served, announced or not, and the base
              version and φ size k that patches for it must carry)
    rejects   messages refused by validation or admission, with their reason
    quarantine accepted messages the database would not store (the row-by-row retry's leftovers)

Rejects and quarantine keep a payload's first bytes, sha256 and size, and expire after `retention_s`.

Writes come in batches (`commit_batch`): one transaction for many messages is what makes ingest fast on
SQLite with synchronous=FULL (one fsync per batch, not per message). Inserts use the dialect's
`ON CONFLICT DO NOTHING`, never read-then-write, so duplicates are race-free.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    Engine,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url

from edgepatch.protocol.messages import Message, PatchUpdate
from edgepatch.protocol.wire import canonical_bytes, to_json

from .store_bulk import PHI_DTYPE, PgBulk, batch_rows
from .store_records import (  # noqa: F401 - re-exported: the ingest and tests import them from here
    DEFAULT_RETENTION_S,
    BatchResult,
    Quarantined,
    Received,
    Reject,
    is_transient,
    one_line,
    payload_record,
    printable,
)
from .store_schema import sqlite_begin, sqlite_pragmas, store_tables, upgrade_tables

log = logging.getLogger(__name__)


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class PatchStore:
    """Open (and create) the store at `url`: a SQLAlchemy URL, or a plain file path meaning SQLite."""

    def __init__(self, url: str | Path, *, table_prefix: str = "", echo: bool = False,
                 retention_s: float = DEFAULT_RETENTION_S) -> None:
        text = str(url)
        if "://" not in text:
            Path(text).parent.mkdir(parents=True, exist_ok=True)
            text = sqlite_url(text)
        parsed = make_url(text)
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported store URL {parsed.render_as_string(hide_password=True)!r}: "
                             "use a SQLite file path or a postgresql+psycopg2:// URL")
        if self.dialect == "sqlite" and parsed.database in (None, "", ":memory:"):
            raise ValueError("an in-memory SQLite store would lose acknowledged patches: give a file path")
        if table_prefix and not table_prefix.replace("_", "").isalnum():
            raise ValueError(f"table_prefix {table_prefix!r} must be letters, digits and '_'")
        if retention_s <= 0:
            raise ValueError(f"retention_s must be > 0 seconds, got {retention_s}")
        self.url = parsed.render_as_string(hide_password=True)
        self.table_prefix = table_prefix
        self.retention_s = float(retention_s)
        self._next_expiry = 0.0  # monotonic time of the next automatic expire()
        self.engine: Engine = create_engine(parsed, echo=echo, future=True,
                                            **({"connect_args": {"timeout": 30}} if self.dialect == "sqlite"
                                               else {"pool_pre_ping": True}))
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", sqlite_pragmas)
            event.listen(self.engine, "begin", sqlite_begin)
        self._insert = sqlite.insert if self.dialect == "sqlite" else postgresql.insert
        self.metadata, self.t = store_tables(table_prefix)
        self.metadata.create_all(self.engine)
        for change in upgrade_tables(self.engine, self.metadata):  # a store an older version created
            log.info("store schema upgraded: %s", change)
        # Built once: constructing these per batch costs about a millisecond.
        self._stmt_patches = self._insert(self.t["patches"]).on_conflict_do_nothing(
            index_elements=["content_hash"]).returning(self.t["patches"].c.content_hash)
        self._stmt_metrics = self._insert(self.t["metrics"]).on_conflict_do_nothing(
            index_elements=["content_hash", "name"])
        self._stmt_devices = self._device_upsert()
        # PostgreSQL: one statement per table per batch (cloud/store_bulk.py); SQLite runs executemany in-process.
        self._bulk = PgBulk(self.t) if self.dialect == "postgresql" else None

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn.info["write"] = True
            try:
                with conn.begin():
                    yield conn
            finally:
                conn.info.pop("write", None)

    def close(self) -> None:
        self.engine.dispose()

    def drop_all(self) -> None:
        """Drop this store's tables (tests on a shared PostgreSQL clean up after themselves)."""
        self.metadata.drop_all(self.engine)

    # --------------------------------------------------------------------------------------------- writes

    def add_patch(self, msg: Message, *, nbytes: int = 0, received_at: float | None = None) -> bool:
        """Store one patch update; False if a patch with the same content hash is already stored."""
        if not isinstance(msg.payload, PatchUpdate):
            raise TypeError(f"add_patch takes a patch_update message, got kind {msg.kind!r}")
        result = self.commit_batch([Received(msg, nbytes, time.time() if received_at is None else received_at)])
        return bool(result.new_patches)

    def commit_or_quarantine(self, accepted: Sequence[Received], rejects: Sequence[Reject] = ()) -> BatchResult:
        """`commit_batch`, and when the batch fails for its rows' sake, the same row by row: every row the
        database refuses goes to `quarantine` with the database's reason, so one poison message never
        stalls the stream (every message of the batch can be acknowledged afterwards). A failure of the
        database itself (connection lost, locked) is raised: nothing is acknowledged, the broker redelivers."""
        try:
            result = self.commit_batch(accepted, rejects)
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_transient(exc):
                raise
            log.warning("batch of %d messages refused by the database (%s); retrying row by row",
                        len(accepted) + len(rejects), one_line(exc))
            result = self._row_by_row(accepted, rejects)
        self._maybe_expire()
        return result

    def _row_by_row(self, accepted: Sequence[Received], rejects: Sequence[Reject]) -> BatchResult:
        result = BatchResult(rows_retried=len(accepted) + len(rejects))
        for item in accepted:
            try:
                one = self.commit_batch([item])
            except Exception as exc:  # noqa: BLE001 - classified
                if is_transient(exc):
                    raise
                q = Quarantined(item.message, type(exc).__name__, one_line(exc))
                self._quarantine(item, q)
                result.quarantined.append(q)
                continue
            result.new_patches += one.new_patches
            result.duplicates += one.duplicates
            result.stored += one.stored
        for r in rejects:
            try:
                self.commit_batch([], [r])
            except Exception as exc:  # noqa: BLE001 - a reject is refused anyway: log it, never stall on it
                if is_transient(exc):
                    raise
                log.error("could not record a reject (%s on %s): %s", r.reason, r.topic, one_line(exc))
        return result

    def _quarantine(self, item: Received, q: Quarantined) -> None:
        m = item.message
        raw = item.raw if item.raw is not None else canonical_bytes(to_json(m))
        log.error("quarantined %s %s from %s/%s: %s: %s", m.kind, m.content_hash[:12], m.fleet, m.device_id,
                  q.reason, q.detail[:300])
        with self._write() as conn:
            conn.execute(self.t["quarantine"].insert(), {
                "reason": q.reason[:64], "kind": printable(m.kind, 32), "fleet": printable(m.fleet, 64),
                "device_id": printable(m.device_id, 64), "content_hash": printable(m.content_hash, 64),
                "t": item.received_at, "detail": printable(q.detail), **payload_record(raw)})

    def expire(self, now: float | None = None) -> int:
        """Delete rejects and quarantine records older than `retention_s`; returns how many went."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        gone = 0
        with self._write() as conn:
            for name in ("rejects", "quarantine"):
                t = self.t[name]
                gone += conn.execute(delete(t).where(t.c.t < cutoff)).rowcount or 0
        return gone

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now < self._next_expiry:
            return
        self._next_expiry = now + min(60.0, self.retention_s / 10)
        try:
            gone = self.expire()
        except Exception as exc:  # noqa: BLE001 - housekeeping must not fail a committed batch
            log.warning("expiring old rejects failed: %s", one_line(exc))
            return
        if gone:
            log.info("expired %d reject/quarantine records older than %.0f s", gone, self.retention_s)

    def commit_batch(self, accepted: Sequence[Received], rejects: Sequence[Reject] = ()) -> BatchResult:
        """Write a batch of validated messages and rejects in ONE transaction; return what was new.

        Idempotent: replaying the same batch stores nothing new (patches/metrics dedupe by content hash)."""
        result = BatchResult()
        rows = batch_rows(accepted)
        result.duplicates = rows.duplicates
        dev = rows.devices
        bulk = self._bulk
        with self._write() as conn:
            if rows.patches:
                if bulk is not None:
                    new_hashes = bulk.insert_patches(conn, rows.patches)
                else:
                    new_hashes = {row[0] for row in conn.execute(self._stmt_patches, rows.patches)}
                result.new_patches = [msg for h, msg in rows.patch_msgs.items() if h in new_hashes]
                result.duplicates += len(rows.patches) - len(new_hashes)
                for m in result.new_patches:
                    dev[(m.fleet, m.device_id)]["patches"] += 1
            if rows.metrics:
                if bulk is not None:
                    bulk.insert_metrics(conn, rows.metrics)
                else:
                    conn.execute(self._stmt_metrics, rows.metrics)
            if dev:
                # Sorted so concurrent workers lock device rows in the same order (no deadlocks on PostgreSQL).
                devices = sorted(dev.values(), key=lambda r: (r["fleet"], r["device_id"]))
                if bulk is not None:
                    bulk.upsert_devices(conn, devices)
                else:
                    conn.execute(self._stmt_devices, devices)
            if rejects:
                conn.execute(self.t["rejects"].insert(),
                             [{"reason": printable(r.reason, 32), "topic": printable(r.topic, 1000), "t": r.t,
                               "detail": printable(r.detail), "payload_prefix": r.payload_prefix,
                               "payload_sha256": r.payload_sha256, "payload_size": r.payload_size}
                              for r in rejects])
        result.stored = len(accepted) - result.duplicates
        return result

    def _device_upsert(self) -> Any:
        t = self.t["devices"]
        stmt = self._insert(t)
        ex = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=["fleet", "device_id"],
            set_={
                "last_seen": func.max(t.c.last_seen, ex.last_seen) if self.dialect == "sqlite"
                else func.greatest(t.c.last_seen, ex.last_seen),
                "last_state": func.coalesce(ex.last_state, t.c.last_state),
                "variant_id": ex.variant_id,
                "base_version": ex.base_version,
                "bytes_in": t.c.bytes_in + ex.bytes_in,
                "patches": t.c.patches + ex.patches,
                "holdout_acc": func.coalesce(ex.holdout_acc, t.c.holdout_acc),
            })

    def add_bundle(self, version: str, manifest_sha256: str, reference: str, *,
                   created_at: float | None = None, base_version: str | None = None, k: int | None = None) -> bool:
        """Register a bundle version; False if that version is already registered (unchanged).
        `base_version` and `k`: what patches for this bundle must name and carry (see `bundle_bases`)."""
        stmt = self._insert(self.t["bundles"]).on_conflict_do_nothing(index_elements=["version"])
        with self._write() as conn:
            res = conn.execute(stmt, {"version": version, "manifest_sha256": manifest_sha256,
                                      "reference": reference, "base_version": base_version, "k": k,
                                      "created_at": time.time() if created_at is None else created_at})
            return bool(res.rowcount)

    def bundle_bases(self) -> dict[str, int]:
        """base version -> φ size k, over every registered bundle that named them."""
        t = self.t["bundles"]
        q = select(t.c.base_version, t.c.k).where(t.c.base_version.is_not(None), t.c.k.is_not(None))
        with self.engine.connect() as conn:
            return {str(b): int(k) for b, k in conn.execute(q)}

    def mark_announced(self, version: str, t: float | None = None) -> None:
        with self._write() as conn:
            res = conn.execute(update(self.t["bundles"]).where(self.t["bundles"].c.version == version)
                               .values(announced_at=time.time() if t is None else t))
            if res.rowcount != 1:
                raise KeyError(f"bundle version {version!r} is not registered")

    # ---------------------------------------------------------------------------------------------- reads

    def latest_patches(self, base_version: str | None = None, fleet: str | None = None
                       ) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """Each device's newest patch -> (phi float32[k], metadata). Newest = last to ARRIVE (the id the store
        assigned), never the highest claimed `seq`: a device that once sent seq = 2^53 would otherwise pin its
        "latest" to that patch forever (issue 11)."""
        p = self.t["patches"]
        rank = func.row_number().over(partition_by=(p.c.fleet, p.c.device_id),
                                      order_by=p.c.id.desc()).label("rank")
        inner = select(p, rank)
        if base_version is not None:
            inner = inner.where(p.c.base_version == base_version)
        if fleet is not None:
            inner = inner.where(p.c.fleet == fleet)
        sub = inner.subquery()
        out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(select(sub).where(sub.c.rank == 1).order_by(sub.c.device_id)).mappings():
                phi = np.frombuffer(row["phi"], dtype=PHI_DTYPE).astype(np.float32)
                if phi.size != row["k"]:
                    raise ValueError(f"stored phi of {row['device_id']} has {phi.size} floats, k={row['k']}")
                meta = {k: row[k] for k in ("id", "fleet", "base_version", "variant_id", "seq", "content_hash",
                                            "steps", "samples", "holdout_acc", "loss", "sent_at", "received_at")}
                out[row["device_id"]] = (phi, meta)
        return out

    def devices(self, fleet: str | None = None) -> list[dict[str, Any]]:
        t = self.t["devices"]
        q = select(t).order_by(t.c.fleet, t.c.device_id)
        if fleet is not None:
            q = q.where(t.c.fleet == fleet)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def patch_hashes(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(self.t["patches"].c.content_hash))]

    def patch_seqs(self, device_id: str) -> list[int]:
        p = self.t["patches"]
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(p.c.seq).where(p.c.device_id == device_id).order_by(p.c.seq))]

    def rejects(self, limit: int = 1000) -> list[dict[str, Any]]:
        t = self.t["rejects"]
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(t).order_by(t.c.id).limit(limit)).mappings()]

    def quarantined(self, limit: int = 1000) -> list[dict[str, Any]]:
        t = self.t["quarantine"]
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(t).order_by(t.c.id).limit(limit)).mappings()]

    def metric_values(self, device_id: str, name: str) -> list[tuple[float, float]]:
        t = self.t["metrics"]
        q = select(t.c.t, t.c.value).where(t.c.device_id == device_id, t.c.name == name).order_by(t.c.t)
        with self.engine.connect() as conn:
            return [(float(a), float(b)) for a, b in conn.execute(q)]

    def latest_bundle(self) -> dict[str, Any] | None:
        t = self.t["bundles"]
        with self.engine.connect() as conn:
            row = conn.execute(select(t).order_by(t.c.created_at.desc(), t.c.version.desc()).limit(1)).mappings().first()
        return dict(row) if row else None

    def bundles(self) -> list[dict[str, Any]]:
        t = self.t["bundles"]
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(t).order_by(t.c.created_at)).mappings()]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                    for name, t in self.t.items()}

    def count(self, table: str) -> int:
        if table not in self.t:
            raise KeyError(f"no table {table!r}; tables: {sorted(self.t)}")
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self.t[table])).scalar_one())


