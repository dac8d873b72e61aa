"""Bundle archives (.tar, .tar.gz, .zip) unpacked safely: regular files and directories only, no member
escaping the destination, and a size budget against zip/tar bombs. Standard library only."""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from .manifest import MANIFEST_NAME, BundleError

MAX_ARCHIVE_BYTES = 4 << 30  # unpacked size limit for archives (zip/tar bombs)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_CHUNK = 1 << 20


def _safe_member_path(dest: Path, name: str, archive: Path) -> Path:
    pure = PurePosixPath(name.rstrip("/"))
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or "\x00" in name:
        raise BundleError(f"{archive}: member {name!r} would escape the bundle (path traversal)")
    return dest.joinpath(*pure.parts) if pure.parts else dest


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack regular files and directories only; returns the directory holding manifest.json."""
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
    """Running total of unpacked bytes, against zip/tar bombs."""

    def __init__(self, archive: Path) -> None:
        self.archive, self.total = archive, 0

    def take(self, size: int) -> None:
        self.total += size
        if self.total > MAX_ARCHIVE_BYTES:
            raise BundleError(f"{self.archive}: unpacks to more than {MAX_ARCHIVE_BYTES} bytes")


def _unpack_zip(archive: Path, dest: Path) -> None:
    budget = _SizeBudget(archive)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = _safe_member_path(dest, info.filename, archive)
            mode = info.external_attr >> 16
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BundleError(f"{archive}: member {info.filename!r} is a link or special file")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            budget.take(info.file_size)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)


def _unpack_tar(archive: Path, dest: Path) -> None:
    budget = _SizeBudget(archive)
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            target = _safe_member_path(dest, member.name, archive)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise BundleError(f"{archive}: member {member.name!r} is a link or special file")
            budget.take(member.size)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            if src is None:
                raise BundleError(f"{archive}: member {member.name!r} has no data")
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
