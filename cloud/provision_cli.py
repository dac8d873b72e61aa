"""`edgepatch cloud provision`: the typer front of cloud/provision.py (mounted in cloud/cli.py)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from .provision import ProvisionError, ProvisionOptions, provision, revoke, rotate

console = Console(stderr=True)


def provision_cmd(
    out: Path = typer.Option(..., help="directory for the broker config and every credential folder"),
    fleet: str = typer.Option("default", help="fleet name (one fleet per directory)"),
    devices: int = typer.Option(0, help="provision dev-000 … dev-(N-1)"),
    device: list[str] = typer.Option([], "--device", help="provision this device id (repeatable)"),
    host: list[str] = typer.Option([], "--host", help="broker host name or IP for the server certificate "
                                   "(repeatable; the first one goes into broker.url; default localhost, 127.0.0.1)"),
    bind: str = typer.Option("", help="listener address (default: all interfaces)"),
    port: int = typer.Option(8883, help="TLS port for devices"),
    companion_port: int = typer.Option(8884, help="TLS port for the companion"),
    broker_user: str = typer.Option("mosquitto", help="user Mosquitto drops to when started as root"),
    max_message_bytes: int = typer.Option(4 * 1024 * 1024, help="largest MQTT message the broker accepts"),
    rotate_device: list[str] = typer.Option([], "--rotate", help="issue a new password to this device"),
    revoke_device: list[str] = typer.Option([], "--revoke", help="remove this device's login and credentials"),
) -> None:
    """Write a TLS + password + ACL Mosquitto configuration and per-device credentials (see docs/security.md)."""
    ids = [f"dev-{i:03d}" for i in range(devices)] + list(device)
    try:
        if rotate_device or revoke_device:
            for d in rotate_device:
                rotate(out, d)
                console.print(f"rotated {d}: new password in {out / 'devices' / d / 'password'}")
            for d in revoke_device:
                revoke(out, d)
                console.print(f"revoked {d}")
            console.print("send SIGHUP to mosquitto so it re-reads the password file")
            if not ids:
                return
        if not ids and not (out / "provision.json").exists():
            raise ProvisionError("give --devices N or --device ID")
        result = provision(ProvisionOptions(
            fleet=fleet, devices=ids, out=out, hosts=host or ["localhost", "127.0.0.1"], bind=bind, port=port,
            companion_port=companion_port, broker_user=broker_user, max_message_bytes=max_message_bytes))
    except (ProvisionError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"fleet {result.fleet!r}: {len(result.devices)} devices ({len(result.added)} new)")
    console.print(f"broker: mosquitto -c {result.config}")
    console.print(f"companion credentials: {out / 'companion'}  (fleet-signing.key is secret, mode "
                  f"{oct(os.stat(out / 'companion' / 'fleet-signing.key').st_mode & 0o777)})")
    console.print(f"device credentials: {out / 'devices'}/<id>/")
