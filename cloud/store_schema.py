"""The patch store's tables (SQLAlchemy core) and the SQLite connection settings that make batched,
concurrent ingest safe (WAL, synchronous=FULL, BEGIN IMMEDIATE for writers). See cloud/store.py."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Connection


def store_tables(prefix: str) -> tuple[MetaData, dict[str, Table]]:
    md = MetaData()
    p = prefix
    devices = Table(
        f"{p}devices", md,
        Column("fleet", String(64), primary_key=True),
        Column("device_id", String(64), primary_key=True),
        Column("first_seen", Float, nullable=False),
        Column("last_seen", Float, nullable=False),
        Column("last_state", String(16)),
        Column("variant_id", String(256)),
        Column("base_version", String(256)),
        Column("bytes_in", Integer, nullable=False, default=0),
        Column("patches", Integer, nullable=False, default=0),
        Column("holdout_acc", Float),
    )
    patches = Table(
        f"{p}patches", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("fleet", String(64), nullable=False),
        Column("device_id", String(64), nullable=False),
        Column("base_version", String(256), nullable=False),
        Column("variant_id", String(256), nullable=False),
        Column("seq", Integer, nullable=False),
        Column("content_hash", String(64), nullable=False),
        Column("phi", LargeBinary, nullable=False),
        Column("k", Integer, nullable=False),
        Column("steps", Integer, nullable=False),
        Column("samples", Integer, nullable=False),
        Column("holdout_acc", Float, nullable=False),
        Column("loss", Float, nullable=False),
        Column("sent_at", Float, nullable=False),
        Column("received_at", Float, nullable=False),
        UniqueConstraint("content_hash", name=f"{p}uq_patches_hash"),
        Index(f"{p}ix_patches_device", "base_version", "fleet", "device_id", "seq"),
    )
    metrics = Table(
        f"{p}metrics", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("fleet", String(64), nullable=False),
        Column("device_id", String(64), nullable=False),
        Column("name", String(64), nullable=False),
        Column("value", Float, nullable=False),
        Column("t", Float, nullable=False),
        Column("content_hash", String(64), nullable=False),
        UniqueConstraint("content_hash", "name", name=f"{p}uq_metrics_hash_name"),
        Index(f"{p}ix_metrics_device", "fleet", "device_id", "name", "t"),
    )
    bundles = Table(
        f"{p}bundles", md,
        Column("version", String(256), primary_key=True),
        Column("manifest_sha256", String(64), nullable=False),
        Column("reference", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("announced_at", Float),
    )
    rejects = Table(
        f"{p}rejects", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("reason", String(32), nullable=False),
        Column("topic", Text, nullable=False),
        Column("t", Float, nullable=False),
        Column("detail", Text, nullable=False),
    )
    return md, {"devices": devices, "patches": patches, "metrics": metrics, "bundles": bundles,
                "rejects": rejects}


def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit at the driver level; for writes SQLAlchemy's "begin" hook below issues BEGIN IMMEDIATE, so
    # a write transaction takes the write lock up front and concurrent writers queue on busy_timeout
    # instead of failing on a read->write lock upgrade.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed (hence acknowledged) batch survives power loss
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def sqlite_begin(conn: Connection) -> None:
    # Reads run in driver autocommit (WAL readers never block); writes take the lock up front.
    if conn.info.get("write"):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
