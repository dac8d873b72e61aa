"""The patch store's tables (SQLAlchemy core) and the SQLite connection settings that make batched,
concurrent ingest safe (WAL, synchronous=FULL, BEGIN IMMEDIATE for writers). See cloud/store.py."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
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
    inspect,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

# 64-bit everywhere the validator accepts 64-bit integers (protocol/wire.py: seq, steps, samples are
# checked against [0, 2^63-1]); a 32-bit column made one `seq = 2^31` patch fail its whole batch on
# PostgreSQL. Surrogate ids are 64-bit too; on SQLite they stay INTEGER so they alias the rowid (an
# autoincrementing BIGINT primary key is not a rowid alias there and would never be filled in).
Int64 = BigInteger().with_variant(Integer(), "sqlite")
PAYLOAD_PREFIX_BYTES = 256  # what a reject or quarantine record keeps of the payload (plus sha256 and size)


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
        Column("bytes_in", BigInteger, nullable=False, default=0),
        Column("patches", BigInteger, nullable=False, default=0),
        Column("holdout_acc", Float),
    )
    patches = Table(
        f"{p}patches", md,
        # `id` is the arrival order the store assigns: a device's latest patch is its highest id, never its
        # highest claimed `seq` (a device could claim seq = 2^63-1 once and pin its "latest" forever).
        Column("id", Int64, primary_key=True, autoincrement=True),
        Column("fleet", String(64), nullable=False),
        Column("device_id", String(64), nullable=False),
        Column("base_version", String(256), nullable=False),
        Column("variant_id", String(256), nullable=False),
        Column("seq", BigInteger, nullable=False),
        Column("content_hash", String(64), nullable=False),
        Column("phi", LargeBinary, nullable=False),
        Column("k", BigInteger, nullable=False),
        Column("steps", BigInteger, nullable=False),
        Column("samples", BigInteger, nullable=False),
        Column("holdout_acc", Float, nullable=False),
        Column("loss", Float, nullable=False),
        Column("sent_at", Float, nullable=False),
        Column("received_at", Float, nullable=False),
        UniqueConstraint("content_hash", name=f"{p}uq_patches_hash"),
        Index(f"{p}ix_patches_device", "base_version", "fleet", "device_id", "id"),
    )
    metrics = Table(
        f"{p}metrics", md,
        Column("id", Int64, primary_key=True, autoincrement=True),
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
        # What the ingest checks patches against: a patch must name a registered base version and carry
        # exactly `k` floats (NULL for bundles registered without them).
        Column("base_version", String(256)),
        Column("k", BigInteger),
        Index(f"{p}ix_bundles_base", "base_version"),
    )
    # Refused messages (validation or admission) and quarantined ones (accepted, but the database would not
    # store them): never the whole payload, only its first PAYLOAD_PREFIX_BYTES, sha256 and size; both
    # expire after the store's retention (`PatchStore.expire`).
    rejects = Table(
        f"{p}rejects", md,
        Column("id", Int64, primary_key=True, autoincrement=True),
        Column("reason", String(32), nullable=False),
        Column("topic", Text, nullable=False),
        Column("t", Float, nullable=False),
        Column("detail", Text, nullable=False),
        Column("payload_prefix", LargeBinary),
        Column("payload_sha256", String(64)),
        Column("payload_size", BigInteger),
        Index(f"{p}ix_rejects_t", "t"),
    )
    quarantine = Table(
        f"{p}quarantine", md,
        Column("id", Int64, primary_key=True, autoincrement=True),
        Column("reason", String(64), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("fleet", String(64), nullable=False),
        Column("device_id", String(64), nullable=False),
        Column("content_hash", String(64), nullable=False),
        Column("t", Float, nullable=False),
        Column("detail", Text, nullable=False),
        Column("payload_prefix", LargeBinary, nullable=False),
        Column("payload_sha256", String(64), nullable=False),
        Column("payload_size", BigInteger, nullable=False),
        Index(f"{p}ix_quarantine_t", "t"),
    )
    return md, {"devices": devices, "patches": patches, "metrics": metrics, "bundles": bundles,
                "rejects": rejects, "quarantine": quarantine}


def upgrade_tables(engine: Engine, metadata: MetaData) -> list[str]:
    """Bring tables an older edgepatch created up to this schema (create_all never alters a table): add the
    columns it lacks (all later additions are nullable) and, on PostgreSQL, widen to BIGINT the integer
    columns now declared 64-bit (SQLite integers are 64-bit already). Returns what it changed."""
    insp = inspect(engine)
    pg = engine.dialect.name == "postgresql"
    changes: list[str] = []
    for table in metadata.sorted_tables:
        if not insp.has_table(table.name):
            continue
        existing = {c["name"]: c["type"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            ddl = None
            if col.name not in existing:
                if not col.nullable:
                    raise RuntimeError(f"table {table.name} lacks column {col.name}, which cannot be added")
                ddl = (f'ALTER TABLE "{table.name}" ADD COLUMN {"IF NOT EXISTS " if pg else ""}"{col.name}" '
                       f"{col.type.compile(dialect=engine.dialect)}")
            elif pg and isinstance(col.type, BigInteger) and not isinstance(existing[col.name], BigInteger):
                ddl = f'ALTER TABLE "{table.name}" ALTER COLUMN "{col.name}" TYPE BIGINT'
            if ddl is None:
                continue
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(ddl)
                    if pg and col.primary_key and col.name in existing:  # its serial counter stops at 2^31 too
                        seq = conn.exec_driver_sql(
                            f"SELECT pg_get_serial_sequence('\"{table.name}\"', '{col.name}')").scalar()
                        if seq:
                            conn.exec_driver_sql(f"ALTER SEQUENCE {seq} AS bigint")
            except sa_exc.OperationalError as exc:  # SQLite: another process added it meanwhile
                if "duplicate column" not in str(exc):
                    raise
            changes.append(ddl)
    return changes


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
