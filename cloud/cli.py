"""`edgepatch cloud …`: the companion service and its status."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import urllib.request
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(help="Cloud companion: ingest patches, MoMoDistill, republish bundles.", no_args_is_help=True)
console = Console(stderr=True)
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


@app.command("serve")
def serve_cmd(
    bundle: Path = typer.Option(..., help="the bundle to publish first"),
    broker: str = typer.Option(DEFAULT_BROKER, help="mqtt://host:port, mqtts://host:port, or 'embedded' (amqtt)"),
    protocol: str = typer.Option("5", help="MQTT protocol: 5 or 3.1.1"),
    db: str | None = typer.Option(None, help="SQLAlchemy URL or SQLite path (default: WORK/companion.sqlite)"),
    work_dir: Path = typer.Option(Path("edgepatch-cloud"), help="published bundles, default store"),
    fleet: str = typer.Option("default"),
    http_port: int = typer.Option(8080, help="fleet page, /metrics and bundle downloads (0 = any free port)"),
    http_host: str = typer.Option("127.0.0.1", help="address the web server listens on (0.0.0.0: every "
                                  "interface, for devices on other machines)"),
    public_url: str | None = typer.Option(None, help="the web address devices are told for bundle downloads, "
                                          "e.g. https://fleet.example.com (default http://HTTP_HOST:HTTP_PORT, this "
                                          "machine's name for 0.0.0.0)"),
    max_message_bytes: int = typer.Option(64 * 1024, min=1, help="device messages larger than this are refused "
                                          "before decoding (counted as rejects, reason oversize)"),
    reject_retention_days: float = typer.Option(7.0, help="rejected and quarantined message records expire "
                                                "after this many days"),
    provisioned: Path | None = typer.Option(None, help="the `cloud provision --out` directory: only its devices' "
                                            "messages and Canoe histograms are admitted (default: the fleet "
                                            "directory around --credentials, when it has provision.json)"),
    distill_after: int = typer.Option(0, help="distil once this many devices reported on the current base "
                                      "(0 = only on request)"),
    base_every: int = typer.Option(10, min=1, help="base-update period R in device rounds (one round = one φ "
                                   "training round ending in one patch upload): with --distill-after N, distil "
                                   "once N devices each sent R patches for the current base; 1 = every round"),
    aggregator: str = typer.Option("momodistill", help="momodistill, model_over_data or fedavg_patches"),
    delta_encoding: str = typer.Option("int8", help="how a base update's change travels to devices holding the "
                                       "parent: int8 (per-row scales, a quarter of the parameter bytes), float16 "
                                       "(half), or none (devices download the parameters); devices rebuild the "
                                       "published weights exactly either way"),
    mode: str = typer.Option("proxy", help="MoMoDistill data mode: proxy, teacher_outputs or samples"),
    canoe: bool = typer.Option(False, "--canoe/--no-canoe", help="also match Canoe help requests to helper "
                               "devices (counters on /metrics, requests and ensemble weights on /fleet)"),
    canoe_timeout: float = typer.Option(5.0, help="seconds to wait for a Canoe helper before trying the next"),
    data: Path | None = typer.Option(None, help="labelled data for distillation: a shard directory or an .npz "
                                     "with x, y (checked against the bundle's input at start-up)"),
    proxy: Path | None = typer.Option(None, help="unlabelled proxy set (shard directory or .npz with x) for "
                                      "MoMoDistill's proxy mode; default: the inputs of --data"),
    credentials: Path | None = typer.Option(None, help="the companion folder `cloud provision` wrote: TLS (ca.crt), "
                                            "login (username, password file) and, with fleet-signing.key, "
                                            "signed announcements; its broker.url unless --broker is given"),
    signing_key: Path | None = typer.Option(None, help="Ed25519 key signing every announcement (default: "
                                            "CREDENTIALS/fleet-signing.key when present)"),
) -> None:
    """Run the companion until SIGINT/SIGTERM."""
    from edgepatch.logs import show_level
    from edgepatch.protocol.manifest import BundleError
    from edgepatch.protocol.transport import parse_broker

    from .broker import EmbeddedBroker
    from .companion import Companion, CompanionConfig, CompanionError

    show_level("INFO")  # our records on the terminal; frameworks' go to the log file
    embedded = None
    if broker == "embedded":
        embedded = EmbeddedBroker().start()
        host, port, proto = embedded.host, embedded.port, embedded.protocol
        console.print(f"embedded broker on {embedded.url}")
    else:
        host, port = parse_broker(broker)
        proto = protocol  # any MqttVersion spelling
    try:  # data, bundle and aggregator are checked before anything connects
        mqtt = None
        if credentials is not None:  # secrets from files, never from the command line (docs/security.md)
            from .provision import companion_mqtt_settings

            mqtt = companion_mqtt_settings(credentials, None if broker == DEFAULT_BROKER else broker, proto)
            signing_key = signing_key or (credentials / "fleet-signing.key" if
                                          (credentials / "fleet-signing.key").exists() else None)
            if provisioned is None and (credentials.parent / "provision.json").is_file():
                provisioned = credentials.parent  # provisioned credentials: provisioned devices only
        companion = Companion(CompanionConfig(
            bundle=bundle, work_dir=work_dir, broker_host=host, broker_port=port, protocol=proto, fleet=fleet,
            db_url=db, http_port=http_port, distill_after=distill_after, base_every=base_every,
            aggregator=aggregator, delta_encoding=None if delta_encoding == "none" else delta_encoding,
            distill={"mode": mode}, canoe=canoe, canoe_timeout_s=canoe_timeout, data=data, proxy=proxy,
            mqtt=mqtt, signing_key=signing_key, http_host=http_host, public_url=public_url,
            max_message_bytes=max_message_bytes, reject_retention_s=reject_retention_days * 86400.0,
            provisioned=provisioned))
    except (CompanionError, BundleError, ValueError, OSError) as exc:
        if embedded is not None:
            embedded.stop()
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from exc
    companion.start_background()
    console.print(escape(companion.startup_note()), soft_wrap=True)
    if companion.policy.devices is not None:
        console.print(escape(f"admitting only the {len(companion.policy.devices.devices)} devices provisioned "
                             f"in {companion.policy.devices.path}"), soft_wrap=True)
    console.print(f"companion serving fleet {fleet!r}: {companion.web.url}/fleet  {companion.web.url}/metrics"
                  + ("  (canoe matching on)" if canoe else ""))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    companion.stop()
    if embedded is not None:
        embedded.stop()


@app.command("status")
def status_cmd(url: str = typer.Option("http://127.0.0.1:8080", help="the companion's web address")) -> None:
    """Devices, bundle and counters of a running companion (from its /api/fleet)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/fleet", timeout=10) as resp:  # noqa: S310
            data = json.loads(resp.read())
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot reach the companion at {url}: {exc}")
        raise typer.Exit(2) from exc
    print(json.dumps(data, indent=2))


from .provision_cli import provision_cmd  # noqa: E402  (its options live beside cloud/provision.py)

app.command("provision")(provision_cmd)
