"""A batch of validated messages as table rows, and its one-statement-per-table write on PostgreSQL.

Why (issue 12, fleet load): through SQLAlchemy's executemany, psycopg2 sent the metrics and device rows one
round trip per row — a 600-message batch took ~350 ms of wall time, most of it PostgreSQL parsing and
planning 900 single-row statements, and ~100 µs of client CPU per message building parameters. Here each
table gets ONE `INSERT … SELECT FROM unnest(column arrays)`: psycopg2 quotes the arrays in C, the server
plans once. Same semantics as the SQLAlchemy path (SQLite keeps using that): patches and metrics
`ON CONFLICT DO NOTHING` (idempotent redelivery), devices upserted in a sorted order (concurrent workers lock
rows in the same order), new patches named by `RETURNING content_hash`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Table
from sqlalchemy.engine import Connection

from edgepatch.protocol.messages import DeviceState, Message, Metrics, PatchUpdate

from .store_records import Received

PHI_DTYPE = "<f4"
PATCH_COLUMNS = ("fleet", "device_id", "base_version", "variant_id", "seq", "content_hash", "phi", "k", "steps",
                 "samples", "holdout_acc", "loss", "sent_at", "received_at")
METRIC_COLUMNS = ("fleet", "device_id", "name", "value", "t", "content_hash")
DEVICE_COLUMNS = ("fleet", "device_id", "first_seen", "last_seen", "last_state", "variant_id", "base_version",
                  "bytes_in", "patches", "holdout_acc")


@dataclass
class BatchRows:
    patches: list[dict[str, Any]] = field(default_factory=list)
    patch_msgs: dict[str, Message] = field(default_factory=dict)  # content hash -> message, batch-unique
    metrics: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0  # patches repeated inside the batch


def batch_rows(accepted: Sequence[Received]) -> BatchRows:
    """The rows a batch writes: one per distinct patch, one per metric value, one per device touched."""
    out = BatchRows()
    dev = out.devices
    for item in accepted:
        m = item.message
        d = dev.get((m.fleet, m.device_id))
        if d is None:
            d = dev[(m.fleet, m.device_id)] = {
                "fleet": m.fleet, "device_id": m.device_id, "first_seen": item.received_at,
                "last_seen": item.received_at, "last_state": None, "variant_id": m.variant_id,
                "base_version": m.base_version, "bytes_in": 0, "patches": 0, "holdout_acc": None}
        d["last_seen"] = max(d["last_seen"], item.received_at)
        d["bytes_in"] += item.nbytes
        d["variant_id"], d["base_version"] = m.variant_id, m.base_version
        p = m.payload
        if isinstance(p, PatchUpdate):
            if m.content_hash in out.patch_msgs:
                out.duplicates += 1
                continue
            out.patch_msgs[m.content_hash] = m
            phi = np.ascontiguousarray(p.phi, dtype=PHI_DTYPE)
            out.patches.append({
                "fleet": m.fleet, "device_id": m.device_id, "base_version": m.base_version,
                "variant_id": m.variant_id, "seq": m.seq, "content_hash": m.content_hash,
                "phi": phi.tobytes(), "k": int(phi.size), "steps": p.steps, "samples": p.samples,
                "holdout_acc": p.holdout_acc, "loss": p.loss, "sent_at": m.sent_at,
                "received_at": item.received_at})
            d["holdout_acc"] = p.holdout_acc
        elif isinstance(p, Metrics):
            out.metrics.extend({"fleet": m.fleet, "device_id": m.device_id, "name": name, "value": value,
                                "t": m.sent_at, "content_hash": m.content_hash} for name, value in p.values.items())
        elif isinstance(p, DeviceState):
            d["last_state"] = p.state
        else:
            raise TypeError(f"the store does not keep {m.kind!r} messages")
    return out


def _unnest(table: Table, columns: Sequence[str]) -> str:
    types = {c.name: c.type for c in table.columns}
    arrays = ", ".join(f"%s::{_pg_type(types[c])}[]" for c in columns)
    return f'INSERT INTO "{table.name}" ({", ".join(columns)}) SELECT * FROM unnest({arrays})'


def _pg_type(t: Any) -> str:
    name = type(t).__name__.lower()
    return {"string": "text", "text": "text", "biginteger": "bigint", "integer": "bigint", "float": "float8",
            "largebinary": "bytea"}[name]


class PgBulk:
    """The three statements for one store's tables (built once)."""

    def __init__(self, t: dict[str, Table]) -> None:
        self._numeric = {name: {c: kind for c in cols if (kind := _pg_type(t[name].c[c].type)) in _NUMERIC}
                         for name, cols in (("patches", PATCH_COLUMNS), ("metrics", METRIC_COLUMNS),
                                            ("devices", DEVICE_COLUMNS))}
        self.patches = (_unnest(t["patches"], PATCH_COLUMNS)
                        + " ON CONFLICT (content_hash) DO NOTHING RETURNING content_hash")
        self.metrics = _unnest(t["metrics"], METRIC_COLUMNS) + " ON CONFLICT (content_hash, name) DO NOTHING"
        d = t["devices"].name
        self.devices = (_unnest(t["devices"], DEVICE_COLUMNS) + " ON CONFLICT (fleet, device_id) DO UPDATE SET "
                        f'last_seen = greatest("{d}".last_seen, excluded.last_seen), '
                        f'last_state = coalesce(excluded.last_state, "{d}".last_state), '
                        "variant_id = excluded.variant_id, base_version = excluded.base_version, "
                        f'bytes_in = "{d}".bytes_in + excluded.bytes_in, '
                        f'patches = "{d}".patches + excluded.patches, '
                        f'holdout_acc = coalesce(excluded.holdout_acc, "{d}".holdout_acc)')

    def insert_patches(self, conn: Connection, rows: list[dict[str, Any]]) -> set[str]:
        res = conn.exec_driver_sql(self.patches, _columns(rows, PATCH_COLUMNS, self._numeric["patches"]))
        return {r[0] for r in res}

    def insert_metrics(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        conn.exec_driver_sql(self.metrics, _columns(rows, METRIC_COLUMNS, self._numeric["metrics"]))

    def upsert_devices(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        conn.exec_driver_sql(self.devices, _columns(rows, DEVICE_COLUMNS, self._numeric["devices"]))


_NUMERIC = {"bigint": lambda v: str(operator.index(v)), "float8": lambda v: repr(float(v))}


def _columns(rows: list[dict[str, Any]], columns: Sequence[str], numeric: dict[str, str]) -> tuple[Any, ...]:
    """One parameter per column: a list (psycopg2 quotes it as an array), or for a numeric column the array
    literal itself: psycopg2 adapts each number of a list on its own (~1 µs a float, ~8 values a patch),
    while str() of an int and repr() of a float are valid PostgreSQL input (finite: decode() refused the
    rest; numpy scalars converted first, their repr is not a number)."""
    out: list[Any] = []
    for c in columns:
        values = [r[c] for r in rows]
        kind = numeric.get(c)
        if kind is None:
            out.append(values)
        else:
            fmt = _NUMERIC[kind]
            out.append("{" + ",".join("NULL" if v is None else fmt(v) for v in values) + "}")
    return tuple(out)
