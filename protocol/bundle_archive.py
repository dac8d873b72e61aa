"""Bundle archives (.tar, .tar.gz, .zip) unpacked safely: regular files and directories only, no member
escaping the destination, and each file bounded by the size the manifest declares (zip/tar bombs). Standard library only."""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .manifest import MANIFEST_NAME, BundleError

MAX_ARCHIVE_BYTES = 4 << 30  # unpacked size limit for archives (zip/tar bombs)
MAX_UNDECLARED_BYTES = 1 << 20  # files the manifest does not name (a README in a hand-made archive)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_CHUNK = 1 << 20


def _safe_member_path(dest: Path, name: str, archive: Path) -> Path:
    pure = PurePosixPath(name.rstrip("/"))
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or "\x00" in name:
        raise BundleError(f"{archive}: member {name!r} would escape the bundle (path traversal)")
    return dest.joinpath(*pure.parts) if pure.parts else dest


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack regular files and directories only; returns the directory holding manifest.json.

    Bounded by the manifest (issue 12: a 1 MB archive bomb wrote 1.05 GB before it was refused): the
    manifest is read first (at most bundle.MAX_MANIFEST_BYTES), then each artifact may unpack to its
    declared size and files the manifest does not name share MAX_UNDECLARED_BYTES. Bytes are counted while
    writing, never taken from member headers (a zip header can lie), so a bomb stops at its declared size."""
    try:
        if archive.name.endswith(".zip"):
            _unpack_zip(archive, dest)
        else:
            _unpack_tar(archive, dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise BundleError(f"{archive}: unreadable archive: {exc}") from exc
    if (dest / MANIFEST_NAME).is_file():
        return dest
    children = list(dest.iterdir())
    if len(children) == 1 and (children[0] / MANIFEST_NAME).is_file():
        return children[0]  # an archive of the bundle directory itself
    raise BundleError(f"{archive}: no {MANIFEST_NAME} at its top level (or in its single top directory)")


class _SizeBudget:
    """What each member may unpack to, from the manifest's declared sizes (and MAX_ARCHIVE_BYTES in all)."""

    def __init__(self, archive: Path, names: list[str]) -> None:
        self.archive, self.total, self.undeclared = archive, 0, MAX_UNDECLARED_BYTES
        parts = [PurePosixPath(n.rstrip("/")).parts for n in names]
        where = [p for p in parts if p[-1:] == (MANIFEST_NAME,) and len(p) <= 2]
        if len(where) != 1:
            raise BundleError(f"{archive}: no {MANIFEST_NAME} at its top level (or in its single top directory)")
        self.prefix = where[0][:-1]
        self.manifest_name = "/".join(where[0])
        self.declared: dict[str, int] = {}

    def read_manifest(self, src: BinaryIO) -> bytes:
        from .bundle import MAX_MANIFEST_BYTES  # bundle.py imports this module
        from .manifest import Manifest

        raw = src.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{self.archive}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = Manifest.from_json(raw)
        self.declared = {"/".join((*self.prefix, *PurePosixPath(e.path).parts)): e.bytes
                         for e in manifest.artifacts.values()}
        self.declared[self.manifest_name] = len(raw)
        return raw

    def copy(self, name: str, src: BinaryIO, dst: BinaryIO) -> None:
        key = "/".join(PurePosixPath(name.rstrip("/")).parts)
        declared = self.declared.pop(key, None)  # a second member of the same name gets no allowance
        limit = declared if declared is not None else self.undeclared
        written = 0
        while chunk := src.read(min(_CHUNK, limit - written + 1)):
            written += len(chunk)
            if written > limit or self.total + written > MAX_ARCHIVE_BYTES:
                what = (f"more than the {declared} bytes the manifest declares" if declared is not None else
                        f"past the {MAX_UNDECLARED_BYTES} bytes allowed for files the manifest does not name")
                raise BundleError(f"{self.archive}: member {name!r} unpacks to {what} (archive bomb?)")
            dst.write(chunk)
        self.total += written
        if declared is None:
            self.undeclared -= written


def _unpack_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:  # every member checked before anything is written
            _safe_member_path(dest, info.filename, archive)
            mode = info.external_attr >> 16  # no file type bits (Python's writestr): a plain file
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BundleError(f"{archive}: member {info.filename!r} is a link or special file")
        budget = _SizeBudget(archive, [i.filename for i in infos if not i.is_dir()])
        with zf.open(budget.manifest_name) as src:
            budget.read_manifest(src)
        for info in infos:
            target = _safe_member_path(dest, info.filename, archive)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                budget.copy(info.filename, src, dst)


def _unpack_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for member in members:  # every member checked before anything is written
            _safe_member_path(dest, member.name, archive)
            if not (member.isdir() or member.isfile()):
                raise BundleError(f"{archive}: member {member.name!r} is a link or special file")
        budget = _SizeBudget(archive, [m.name for m in members if m.isfile()])
        manifest = next(m for m in members if m.isfile() and
                        "/".join(PurePosixPath(m.name.rstrip("/")).parts) == budget.manifest_name)
        src = tf.extractfile(manifest)
        if src is None:
            raise BundleError(f"{archive}: member {manifest.name!r} has no data")
        with src:
            budget.read_manifest(src)
        for member in members:
            target = _safe_member_path(dest, member.name, archive)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            if src is None:
                raise BundleError(f"{archive}: member {member.name!r} has no data")
            with src, open(target, "wb") as dst:
                budget.copy(member.name, src, dst)
