"""Fault runs with real parts (issue 12): devices stream patches through a real Mosquitto to the ingest running
as its own process (SQLite store), a fault strikes mid-stream, and the run counts what the devices were
told and what the store holds. Used by tests/test_app_ack.py and benchmarks/faults.py.

Faults: `broker_restart` (SIGTERM: Mosquitto saves its persistence, but does not restore MQTT 5 shared
subscriptions), `broker_kill9` (SIGKILL: sessions and queues since the last autosave are gone),
`companion_kill9` (SIGKILL of the ingest mid-batch, then a new one on the same session). `run_poison`: poison
messages (POISONS) published mid-stream must neither stall the stream nor be stored (except 64-bit seq).

Counting: `acknowledged` = patches the device counts delivered (with application acks: a PatchAck said
stored/duplicate; without them, the broker's PUBACK emptied the outbox entry); `stored` = sent patches in
the store; `lost` = acknowledged but not stored (must be 0); `unconfirmed` = still in an outbox at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgepatch.cloud.store import PatchStore
from edgepatch.device.link import DeviceLink, LinkSettings
from edgepatch.device.outbox import Outbox
from edgepatch.protocol.messages import PatchUpdate, canonical_bytes, content_hash_of, make_message, to_json

from .brokers import MosquittoBroker

FLEET = "lab"
FAULTS = ("broker_restart", "broker_kill9", "companion_kill9")
PG_FAULTS = ("postgres_restart", "postgres_kill9")  # a private PostgreSQL server, never the shared one
# Poison published mid-stream by a raw client as device "dev-poison" (20 copies, distinct seq/steps):
# seq_2e31 must be STORED (64-bit columns); the others must be refused without stalling the stream.
POISONS = ("seq_2e31", "nul_base_version", "seq_over_64_bits", "oversize_1MiB")


@dataclass
class FaultRow:
    fault: str
    protocol: str
    app_ack: bool
    sent: int
    acknowledged: int
    stored: int
    lost: int
    unconfirmed: int
    duplicates_in_store: int
    resends: int
    peak_rss_mb: float  # the ingest process's peak resident memory (VmHWM), over every incarnation
    seconds: float
    store: str = "sqlite"
    poison_misplaced: int = 0  # poison stored that must not be (or not stored that must be); resource faults
    # (sim/fault_extra.py): 1 when the fault did harm past its bound

    @property
    def survived(self) -> bool:
        return (self.lost == 0 and self.unconfirmed == 0 and self.duplicates_in_store == 0
                and self.poison_misplaced == 0)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "survived": self.survived}


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free port (initdb + pg_ctl as user `postgres` when run as root), so a
    fault run can restart or SIGKILL the database without touching anyone else's server."""

    def __init__(self, workdir: Path) -> None:
        from edgepatch.protocol.ports import free_port

        # Its own temporary folder: the server's user must reach it, and a test's tmp_path is root-only.
        self.root = Path(tempfile.mkdtemp(prefix="edgepatch-pg-"))
        self.dir = self.root / "pgdata"
        self.port = free_port()
        if os.geteuid() == 0:
            subprocess.run(["chown", "postgres", str(self.root)], check=True)
        self._run(["initdb", "-D", str(self.dir), "-A", "trust", "-U", "postgres", "--no-sync"])

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(["pg_ctl", "-D", str(self.dir), "-o", opts, "-w", "-l", str(self.dir / "log"), "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run(["pg_ctl", "-D", str(self.dir), "-m", mode, "-w", "stop"], check=False)

    def kill9(self) -> None:
        pid = int((self.dir / "postmaster.pid").read_text().split()[0])
        children = [c for c in _children(pid)]
        os.kill(pid, signal.SIGKILL)
        for child in children:  # a whole-server crash: its backends die with it (by pid, nothing else)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        time.sleep(0.3)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, cmd: list[str], check: bool = True) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run(prefix + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {done.stderr.decode(errors='replace').strip()[-500:]}")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


class IngestProcess:
    """`python -m edgepatch.cloud.ingest` on a fixed client id (its session persists across kills)."""

    def __init__(self, db: Path | str, broker: MosquittoBroker, protocol: str, workdir: Path,
                 table_prefix: str = "") -> None:
        self.db, self.broker, self.protocol, self.workdir = db, broker, protocol, workdir
        self.table_prefix = table_prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_kb = 0
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def start(self, timeout: float = 60.0) -> None:
        ready = self.workdir / "ingest.ready"
        ready.unlink(missing_ok=True)
        with open(self.workdir / "ingest.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgepatch.cloud.ingest", "--store", str(self.db), "--host", self.broker.host,
                 "--port", str(self.broker.port), "--protocol", self.protocol, "--client-id", "ingest-faults",
                 "--fleet", FLEET, "--ready-file", str(ready), "--log-level", "WARNING",
                 "--table-prefix", self.table_prefix],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ingest did not subscribe: {(self.workdir / 'ingest.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        self._sample()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        self._watch_stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self._sample()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _sample(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))
        except OSError:
            pass  # it just exited

    def _watch(self) -> None:
        while not self._watch_stop.wait(0.2):
            self._sample()


def _patch(device: int, i: int, k: int = 16) -> PatchUpdate:
    return PatchUpdate(phi=np.full(k, device * 10_000 + i, np.float32), steps=i, samples=32, holdout_acc=0.5,
                       loss=0.1)


def run_fault(fault: str, protocol: str, workdir: Path, *, app_ack: bool = True, devices: int = 3,
              patches: int = 60, interval_s: float = 0.02, outage_s: float = 0.5,
              settle_timeout_s: float = 60.0, strike: Callable[[], None] | None = None) -> FaultRow:
    """One run: `devices` links each send `patches` patches `interval_s` apart; the fault strikes after a
    third of them; then wait (up to `settle_timeout_s`) until every outbox is empty. `strike`: a fault of
    another module (sim/fault_extra.py) run at that point instead, `fault` being its name."""
    if strike is None and fault not in FAULTS + PG_FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {FAULTS + PG_FAULTS}")
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    pg = PrivatePostgres(workdir / "pg") if fault in PG_FAULTS else None
    if pg is not None:
        pg.start()
    broker = MosquittoBroker(workdir / "broker").start()
    db: Path | str = pg.url if pg is not None else workdir / "store.db"
    store = PatchStore(db)
    ingest = IngestProcess(db, broker, protocol, workdir)
    links: list[DeviceLink] = []
    delivered: set[str] = set()
    lock = threading.Lock()

    def on_delivered(content_hash: str, status: str) -> None:
        if status in ("stored", "duplicate"):
            with lock:
                delivered.add(content_hash)

    try:
        ingest.start()
        for d in range(devices):
            settings = LinkSettings(fleet=FLEET, device_id=f"dev-{d}", host=broker.host, port=broker.port,
                                    protocol=protocol, keepalive=10, reconnect_min_delay=1, reconnect_max_delay=2,
                                    app_ack=app_ack, ack_timeout_s=1.0, ack_max_backoff_s=4.0)
            link = DeviceLink(settings, Outbox(workdir / f"dev-{d}.outbox"), base_version="b1", variant_id="v50")
            link.on_delivered.append(on_delivered)
            link.start()
            links.append(link)
        for link in links:
            if not link.wait_connected(10):
                raise RuntimeError("a device did not connect")
        sent: list[str] = []
        for i in range(patches):
            if i == patches // 3:
                strike() if strike is not None else _strike(fault, broker, ingest, outage_s, pg)
            for d, link in enumerate(links):
                sent.append(link.publish_patch(_patch(d, i)).content_hash)
            time.sleep(interval_s)
        deadline = time.monotonic() + settle_timeout_s
        for link in links:
            wait = link.wait_delivered if app_ack else link.wait_drained
            wait(max(0.1, deadline - time.monotonic()))
        if not app_ack:  # the broker's PUBACK was the only acknowledgement the device had
            left = sum(link.outbox.unsent() for link in links)
            delivered = set(sent) if left == 0 else set(sent[: len(sent) - left])
            time.sleep(2.0)  # let the ingest store whatever did reach it
        else:
            time.sleep(0.5)  # late redeliveries land now, and must not add rows
        hashes = store.patch_hashes()
        stored = set(hashes) & set(sent)
        return FaultRow(fault=fault, protocol=protocol, app_ack=app_ack, sent=len(sent),
                        acknowledged=len(delivered), stored=len(stored), lost=len(delivered - stored),
                        unconfirmed=sum(len(link.outbox) for link in links) if app_ack else 0,
                        duplicates_in_store=len(hashes) - len(set(hashes)),
                        resends=sum(link.resends for link in links), peak_rss_mb=round(ingest.peak_kb / 1024, 1),
                        seconds=round(time.monotonic() - t0, 1), store=store.dialect)
    finally:
        for link in links:
            link.stop(timeout=1.0)
            link.outbox.close()
        ingest.stop()
        broker.kill()
        store.close()
        if pg is not None:
            pg.remove()


def _poison_payload(kind: str, i: int) -> bytes:
    msg = make_message(_patch(99, i), device_id="dev-poison", fleet=FLEET, base_version="b1", variant_id="v50",
                       seq=2**31 + i)
    env = to_json(msg)
    if kind == "seq_2e31":
        return canonical_bytes(env)
    if kind == "nul_base_version":
        env["base_version"] = "b1\x00evil"
    elif kind == "seq_over_64_bits":
        env["seq"] = 2**64 + i
    elif kind == "oversize_1MiB":
        env["payload"]["loss"] = 0.1
        return canonical_bytes(env) + b" " * (1024 * 1024)
    env["content_hash"] = content_hash_of(env)  # a correct hash: only the poison itself is wrong
    return canonical_bytes(env)


def run_poison(kind: str, workdir: Path, *, protocol: str = "5", devices: int = 3, patches: int = 60,
               copies: int = 20, settle_timeout_s: float = 60.0, store_url: str | None = None) -> FaultRow:
    """Devices stream valid patches while a raw client publishes `copies` poison messages of `kind` mid-stream.
    The row counts the valid stream (sent/acknowledged/stored/lost) and, in `fault`, where the poison went.
    `store_url`: e.g. PostgreSQL (fresh tables under a unique prefix); default a SQLite file in `workdir`."""
    if kind not in POISONS:
        raise ValueError(f"unknown poison {kind!r}; known: {POISONS}")
    import paho.mqtt.client as mqtt

    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(workdir / "broker").start()
    prefix = f"f{os.getpid()}_{int(time.time() * 1000) % 10**8}_" if store_url else ""
    db: Path | str = store_url or workdir / "store.db"
    store = PatchStore(db, table_prefix=prefix)
    ingest = IngestProcess(db, broker, protocol, workdir, table_prefix=prefix)
    links: list[DeviceLink] = []
    delivered: set[str] = set()
    raw = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="poisoner",
                      protocol=mqtt.MQTTv5)
    try:
        ingest.start()
        for d in range(devices):
            settings = LinkSettings(fleet=FLEET, device_id=f"dev-{d}", host=broker.host, port=broker.port,
                                    protocol=protocol, reconnect_min_delay=1, reconnect_max_delay=2,
                                    ack_timeout_s=1.0, ack_max_backoff_s=4.0)
            link = DeviceLink(settings, Outbox(workdir / f"dev-{d}.outbox"), base_version="b1", variant_id="v50")
            link.on_delivered.append(lambda h, status: delivered.add(h) if status in ("stored", "duplicate") else None)
            link.start()
            links.append(link)
        raw.connect(broker.host, broker.port)
        raw.loop_start()
        sent: list[str] = []
        topic = f"edgepatch/v1/{FLEET}/dev-poison/patch"
        for i in range(patches):
            if i == patches // 3:
                for c in range(copies):
                    raw.publish(topic, _poison_payload(kind, c), qos=1)
            for d, link in enumerate(links):
                sent.append(link.publish_patch(_patch(d, i)).content_hash)
            time.sleep(0.02)
        deadline = time.monotonic() + settle_timeout_s
        for link in links:
            link.wait_delivered(max(0.1, deadline - time.monotonic()))
        time.sleep(0.5)
        hashes = store.patch_hashes()
        stored = set(hashes) & set(sent)
        poison_stored = store.count("patches") - len(stored)
        expected_poison = copies if kind == "seq_2e31" else 0
        unconfirmed = sum(len(link.outbox) for link in links)
        where = f"poison:{kind} (stored {poison_stored}/{copies}, expected {expected_poison})"
        return FaultRow(fault=where, protocol=protocol, app_ack=True, sent=len(sent), acknowledged=len(delivered),
                        stored=len(stored), lost=len(delivered - stored),
                        unconfirmed=unconfirmed, duplicates_in_store=len(hashes) - len(set(hashes)),
                        resends=sum(link.resends for link in links), peak_rss_mb=round(ingest.peak_kb / 1024, 1),
                        seconds=round(time.monotonic() - t0, 1), store=store.dialect,
                        poison_misplaced=abs(poison_stored - expected_poison))
    finally:
        raw.disconnect()
        raw.loop_stop()
        for link in links:
            link.stop(timeout=1.0)
            link.outbox.close()
        ingest.stop()
        broker.kill()
        if prefix:
            store.drop_all()
        store.close()


def _strike(fault: str, broker: MosquittoBroker, ingest: IngestProcess, outage_s: float,
            pg: PrivatePostgres | None = None) -> None:
    if pg is not None:
        pg.stop() if fault == "postgres_restart" else pg.kill9()
        time.sleep(outage_s)
        pg.start()
        return
    if fault == "companion_kill9":
        ingest.kill9()
        time.sleep(outage_s)
        ingest.start()
        return
    if fault == "broker_restart":
        broker.stop()
    else:
        broker.kill()
    time.sleep(outage_s)
    broker.start()
