"""Signed bundle announcements with rollback protection (Ed25519 via `cryptography`).

The companion signs every announcement with the fleet's key (`edgepatch cloud provision` writes it to
`companion/fleet-signing.key`); a device verifies with the provisioned `fleet-signing.pub` BEFORE it
fetches anything, and refuses, with a reason, an announcement that is

    unsigned        no signature or sequence at all
    bad_signature   signed with another key, or any signed field changed afterwards
    wrong_fleet     a valid signature for another fleet (a replay across fleets)
    replayed        a sequence number not newer than the one of the bundle already active
    bad_reference   a reference that is not http(s) (file://, a local path, ftp://, …)

What is signed: the canonical JSON (protocol/messages.canonical_bytes) of a domain tag, the fleet, the
sequence number and every announcement field — version, reference, manifest_sha256, size and each
artifact's sha256. The manifest is covered by its hash: the device checks the downloaded manifest's
sha256 against the signed one before parsing it, and every artifact against the manifest, so one
signature authenticates the whole bundle. The sequence number is chosen by the signer, strictly
increasing (`SequenceFile`), and lives inside the signed bytes, so an old announcement cannot be replayed
with a new number.

Why `cryptography` and not TUF / OpenSSF model signing: the trust model here is one fleet key and one
monotone counter pushed over MQTT; TUF's role files and metadata expiry would need a repository layout
and a client updater the devices do not have, and model signing signs files, not announcements with a
rollback counter. `cryptography` is already a dependency of TLS tooling and has aarch64 wheels.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .messages import canonical_bytes

DOMAIN = "edgepatch-bundle-announcement/1"
SIGNED_FIELDS = ("version", "reference", "manifest_sha256", "size", "artifacts")
ALGORITHM = "ed25519"
REASONS = frozenset({"unsigned", "bad_signature", "wrong_fleet", "replayed", "bad_reference", "bad_key"})


class SignatureError(ValueError):
    """An announcement (or key) that must not be trusted; `reason` is one of REASONS."""

    def __init__(self, reason: str, text: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {text}")
        self.reason = reason


def key_id(public_raw: bytes) -> str:
    """Short name of a public key (first 16 hex of its sha256), so a refusal can say which key signed."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def signed_bytes(fleet: str, sequence: int, announcement: Mapping[str, Any]) -> bytes:
    missing = [f for f in SIGNED_FIELDS if f not in announcement]
    if missing:
        raise SignatureError("unsigned", f"announcement lacks signed field(s) {missing}")
    body = {f: announcement[f] for f in SIGNED_FIELDS}
    if announcement.get("targets"):  # a canary announcement: its audience is signed too
        body["targets"] = announcement["targets"]
    return canonical_bytes({"domain": DOMAIN, "fleet": fleet, "sequence": int(sequence), "announcement": body})


def check_reference(reference: str) -> None:
    """Only http(s) URLs with a host: no file://, no local paths, no other schemes."""
    parsed = urllib.parse.urlparse(reference)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SignatureError("bad_reference", f"bundle reference {reference[:200]!r} is not an http(s) URL")


# -- keys ------------------------------------------------------------------------------------------------

def _load_pem(path: Path, private: bool) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError("bad_key", f"cannot read {path}: {exc.strerror}") from None
    if private and os.name == "posix" and Path(path).stat().st_mode & 0o077:
        raise SignatureError("bad_key", f"{path} is readable by other users: chmod 600 it")
    try:
        key = (serialization.load_pem_private_key(raw, password=None) if private
               else serialization.load_pem_public_key(raw))
    except (ValueError, TypeError) as exc:
        raise SignatureError("bad_key", f"{path} is not a PEM {'private' if private else 'public'} key: "
                             f"{exc}") from None
    wanted = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, wanted):
        raise SignatureError("bad_key", f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


class BundleSigner:
    """The companion's side: holds the fleet's private key."""

    def __init__(self, private_key: Any) -> None:
        self._key = private_key
        self.key_id = key_id(_raw_public(private_key.public_key()))

    @classmethod
    def from_file(cls, path: Path | str) -> BundleSigner:
        return cls(_load_pem(Path(path), private=True))

    def sign(self, fleet: str, sequence: int, announcement: Mapping[str, Any]) -> str:
        """The `signature` text carried in the announcement: `ed25519:<key id>:<base64 signature>`."""
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
            raise ValueError(f"sequence must be a positive integer, got {sequence!r}")
        check_reference(str(announcement.get("reference", "")))  # never sign what devices will refuse
        signature = self._key.sign(signed_bytes(fleet, sequence, announcement))
        return f"{ALGORITHM}:{self.key_id}:{base64.b64encode(signature).decode()}"


class BundleVerifier:
    """The device's side: holds the provisioned public key."""

    def __init__(self, public_key: Any) -> None:
        self._key = public_key
        self.key_id = key_id(_raw_public(public_key))

    @classmethod
    def from_file(cls, path: Path | str) -> BundleVerifier:
        return cls(_load_pem(Path(path), private=False))

    def verify(self, fleet: str, announcement: Mapping[str, Any], active_sequence: int) -> int:
        """Check signature, fleet, freshness and reference; returns the announcement's sequence number.
        `announcement` is the payload's JSON (with `sequence` and `signature`)."""
        from cryptography.exceptions import InvalidSignature

        signature, sequence = announcement.get("signature") or "", announcement.get("sequence")
        if not signature or not sequence:
            raise SignatureError("unsigned", "the announcement carries no signature: refused (this device "
                                 "only installs bundles signed with the fleet key)")
        algorithm, _, rest = str(signature).partition(":")
        signer_id, _, value = rest.partition(":")
        if algorithm != ALGORITHM or not value:
            raise SignatureError("bad_signature", f"signature is not '{ALGORITHM}:<key id>:<base64>'")
        if signer_id != self.key_id:
            raise SignatureError("bad_signature", f"signed with key {signer_id[:16]!r}, the fleet key is "
                                 f"{self.key_id!r}")
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            raise SignatureError("bad_signature", "signature is not valid base64") from None
        if isinstance(sequence, bool) or not isinstance(sequence, int):
            raise SignatureError("bad_signature", f"sequence {sequence!r} is not an integer")
        try:
            self._key.verify(raw, signed_bytes(fleet, sequence, announcement))
        except InvalidSignature:
            raise SignatureError("bad_signature", "the signature does not match the announcement for fleet "
                                 f"{fleet!r} (another fleet's, or a field was changed)") from None
        if sequence <= active_sequence:
            raise SignatureError("replayed", f"sequence {sequence} is not newer than the active bundle's "
                                 f"{active_sequence}")
        check_reference(str(announcement["reference"]))
        return sequence


# -- sequence numbers --------------------------------------------------------------------------------------

class SequenceFile:
    """A persisted counter. The companion takes `next()` per announcement; a device `accept()`s the sequence
    of every bundle it installs. Atomic writes, so a crash never leaves a half number."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def read(self) -> int:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        if not text.isdigit():
            raise ValueError(f"{self.path} does not hold a sequence number: {text[:40]!r}")
        return int(text)

    def accept(self, sequence: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(f"{int(sequence)}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def next(self) -> int:
        """Strictly above the last one, and at least the wall clock in ms: a companion that lost its work
        directory still announces numbers its devices accept."""
        sequence = max(self.read() + 1, int(time.time() * 1000))
        self.accept(sequence)
        return sequence


class AnnouncementGate:
    """A device's check before it fetches an announced bundle: the fleet key's signature, freshness against
    the sequence of the bundle it runs (persisted in `sequence_file`), and an http(s) reference."""

    def __init__(self, public_key: Path | str, fleet: str, sequence_file: Path | str) -> None:
        self.verifier = BundleVerifier.from_file(public_key)
        self.fleet = fleet
        self.sequence = SequenceFile(sequence_file)

    def check(self, announcement: Mapping[str, Any]) -> int:
        """The announcement's sequence number, or SignatureError with the reason to refuse it."""
        return self.verifier.verify(self.fleet, announcement, self.sequence.read())

    def installed(self, sequence: int) -> None:
        """Call after the bundle is installed: older announcements are refused from now on."""
        self.sequence.accept(max(sequence, self.sequence.read()))
