"""Content by reference (claim check): the one fetch for bundles, Canoe slices and federated blobs, and the
federated update archive (numpy + stdlib; urllib at the edge).

A reference is an http(s) URL, a `file://` URL or a local path (`allow_file=False` refuses the last two:
what a device accepts from the network should be http(s) only); http redirects are followed only to the
same scheme, host and port. Every read is bounded: more than `max_bytes` is refused while streaming, and
with `size`/`sha256` the content must match its reference.

With `accept_gzip` an http(s) fetch offers `Accept-Encoding: gzip` (the companion's web server compresses
bundle files that shrink: a manifest to a ninth, cloud/web.py); the body is inflated while streaming, never
beyond the bound (`max_length` on every inflate call: a small gzip bomb costs at most `max_bytes` + one
chunk), and `Wire` counts the bytes that crossed the network next to the content's.
"""

from __future__ import annotations

import hashlib
import io
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from .fl import BlobRef
from .model_spec import ParamInfo
from .params import Params, write_atomic

CHUNK = 1 << 16


class BlobError(ValueError):
    """A reference that cannot be fetched, or content that does not match it."""


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme, host and port: a server cannot send a device elsewhere
    (another host, or http after https)."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        old, new = urllib.parse.urlparse(req.full_url), urllib.parse.urlparse(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise BlobError(f"refusing a redirect from {old.scheme}://{old.netloc} to {new.scheme}://{new.netloc}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameHostRedirects)


class Wire:
    """Bytes that crossed the network for a fetch (compressed when the server sent gzip)."""

    def __init__(self) -> None:
        self.bytes = 0


def _chunks(uri: str, allow_file: bool, timeout_s: float, limit: int, accept_gzip: bool = False,
            wire: Wire | None = None) -> Iterator[bytes]:
    parsed = urllib.parse.urlparse(uri)
    stream: IO[bytes] | Any
    wire = wire or Wire()
    try:
        if parsed.scheme in ("http", "https"):
            headers = {"Accept-Encoding": "gzip"} if accept_gzip else {}
            stream = _OPENER.open(urllib.request.Request(uri, headers=headers), timeout=timeout_s)
            encoding = (stream.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding not in ("identity", "gzip") or (encoding == "gzip" and not accept_gzip):
                stream.close()
                raise BlobError(f"{uri}: content encoding {encoding!r} was not asked for")
            if encoding == "gzip":
                with stream:
                    yield from _inflated(uri, stream, limit, wire)
                return
        elif parsed.scheme in ("file", "") and allow_file:
            path = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme else uri)
            stream = open(path, "rb")  # noqa: SIM115 - closed below
        else:
            raise BlobError(f"reference {uri[:80]!r}: scheme {parsed.scheme or 'file'!r} is not accepted here")
        with stream:
            while chunk := stream.read(CHUNK):
                wire.bytes += len(chunk)
                if wire.bytes > limit:  # stop reading what would be refused anyway
                    raise BlobError(f"{uri} is larger than the {limit} bytes it may have")
                yield chunk
    except OSError as exc:
        raise BlobError(f"cannot fetch {uri}: {exc}") from exc


def _inflated(uri: str, stream: IO[bytes], limit: int, wire: Wire) -> Iterator[bytes]:
    """The gzip body of `stream`, inflated at most `limit` + 1 bytes (the caller refuses the last one)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    produced = 0
    try:
        while raw := stream.read(CHUNK):
            wire.bytes += len(raw)
            if wire.bytes > limit:  # a server only compresses what shrinks
                raise BlobError(f"{uri} is larger than the {limit} bytes it may have")
            while raw and not inflater.eof:
                out = inflater.decompress(raw, limit + 1 - produced)
                raw = inflater.unconsumed_tail
                produced += len(out)
                yield out
                if produced > limit:
                    return
            if inflater.eof and (raw or inflater.unused_data or stream.read(1)):
                raise BlobError(f"{uri}: data after the end of the gzip stream")
    except zlib.error as exc:
        raise BlobError(f"{uri}: corrupt gzip body: {exc}") from exc
    if not inflater.eof:
        raise BlobError(f"{uri}: the gzip body ends early")


def _checked(uri: str, chunks: Iterator[bytes], sink: Any, max_bytes: int, size: int | None,
             sha256: str | None) -> int:
    limit = _limit(max_bytes, size)
    digest, total = hashlib.sha256(), 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise BlobError(f"{uri} is larger than the {limit} bytes it may have")
        digest.update(chunk)
        sink(chunk)
    if (size is not None and total != size) or (sha256 is not None and digest.hexdigest() != sha256):
        raise BlobError(f"{uri}: content does not match its reference ({total} bytes vs {size})")
    return total


def _limit(max_bytes: int, size: int | None) -> int:
    return max_bytes if size is None else min(max_bytes, size)


def fetch_bytes(uri: str, *, max_bytes: int, size: int | None = None, sha256: str | None = None,
                allow_file: bool = True, timeout_s: float = 30.0, accept_gzip: bool = False,
                wire: Wire | None = None) -> bytes:
    """The referenced bytes (bounded, and checked against `size`/`sha256` when given)."""
    parts: list[bytes] = []
    chunks = _chunks(uri, allow_file, timeout_s, _limit(max_bytes, size), accept_gzip, wire)
    _checked(uri, chunks, parts.append, max_bytes, size, sha256)
    return b"".join(parts)


def fetch_to_file(uri: str, target: Path, *, max_bytes: int, size: int | None = None, sha256: str | None = None,
                  allow_file: bool = True, timeout_s: float = 30.0, accept_gzip: bool = False,
                  wire: Wire | None = None) -> int:
    """Stream the referenced content into `target` (bounded, checked like fetch_bytes); returns its bytes
    (the content's; `wire` counts what crossed the network)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = _chunks(uri, allow_file, timeout_s, _limit(max_bytes, size), accept_gzip, wire)
    with open(target, "wb") as out:
        return _checked(uri, chunks, out.write, max_bytes, size, sha256)


def publish_blob(directory: Path, name: str, data: bytes) -> BlobRef:
    """Write `data` atomically under `directory` and return its file:// reference."""
    path = (directory / name).resolve()
    write_atomic(path, data)
    return BlobRef(path.as_uri(), len(data), hashlib.sha256(data).hexdigest())


def fetch_blob(ref: BlobRef, timeout_s: float = 30.0) -> bytes:
    """The referenced bytes, checked against the reference's size and sha256."""
    return fetch_bytes(ref.uri, max_bytes=ref.bytes, size=ref.bytes, sha256=ref.sha256, timeout_s=timeout_s)


# -------------------------------------------------------------------------- federated update archive

def encode_update(delta: Mapping[str, np.ndarray], touched: Mapping[str, np.ndarray]) -> bytes:
    """An .npz of the touched entries only: `<p>.values` (float32) and `<p>.mask` (packed bits)."""
    arrays: dict[str, Any] = {}
    for name, mask in touched.items():
        mask = np.asarray(mask, dtype=bool)
        arrays[f"{name}.values"] = np.asarray(delta[name], dtype=np.float32)[mask]
        arrays[f"{name}.mask"] = np.packbits(mask.reshape(-1))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_update(data: bytes, infos: Mapping[str, ParamInfo]) -> tuple[Params, dict[str, np.ndarray]]:
    """(delta, touched mask as float32) per parameter; every check names the parameter at fault."""
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises several types for corrupt archives
        raise BlobError(f"unreadable update archive: {exc}") from exc
    with npz:
        expected = {f"{n}.{part}" for n in infos for part in ("values", "mask")}
        if set(npz.files) != expected:
            raise BlobError(f"update archive has {sorted(set(npz.files) ^ expected)} unexpected or missing")
        delta: Params = {}
        masks: dict[str, np.ndarray] = {}
        for name, info in infos.items():
            size = int(np.prod(info.shape))
            packed = npz[f"{name}.mask"]
            if packed.dtype != np.uint8 or packed.shape != ((size + 7) // 8,):
                raise BlobError(f"update: mask of {name!r} has shape {packed.shape}, expected {((size + 7) // 8,)}")
            mask = np.unpackbits(packed, count=size).astype(bool).reshape(info.shape)
            values = npz[f"{name}.values"]
            if values.dtype != np.float32 or values.shape != (int(mask.sum()),):
                raise BlobError(f"update: {name!r} has {values.shape} values for {int(mask.sum())} touched entries")
            if not np.all(np.isfinite(values)):
                raise BlobError(f"update: {name!r} holds NaN or inf")
            full = np.zeros(info.shape, np.float32)
            full[mask] = values
            delta[name], masks[name] = full, mask.astype(np.float32)
    return delta, masks
