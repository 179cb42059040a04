"""Where results live: a local directory or a URI (s3://, gs://, ...) through pyarrow.fs.

Writes are atomic where the file system allows it (local: temp file + rename; object
stores: a single PUT), so a crash never leaves a half-written ``best.json``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def normalize(location: str) -> str:
    """An absolute local path (Ray Tune needs one) or the URI unchanged."""
    if is_uri(location):
        base, sep, query = location.partition("?")
        return base.rstrip("/") + sep + query
    if location.startswith("file://"):
        location = location[len("file://"):]
    return str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """``location``/``parts``; a URI keeps its query (``?endpoint_override=...``) at the end."""
    if is_uri(location):
        base, sep, query = location.partition("?")
        return "/".join([base.rstrip("/"), *parts]) + sep + query
    return str(Path(location, *parts))


def _fs(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), normalize(location)


def write_text(location: str, text: str) -> None:
    """Write a small text file atomically."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    fs, path = _fs(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(location: str) -> str:
    fs, path = _fs(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def exists(location: str) -> bool:
    fs, path = _fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove_file(location: str) -> None:
    """Delete a file if it exists."""
    fs, path = _fs(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def remove_dir(location: str) -> None:
    """Delete a directory tree if it exists."""
    fs, path = _fs(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_dir(location: str) -> list[str]:
    """Names of the entries directly under ``location`` (empty if it does not exist)."""
    fs, path = _fs(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def copy_dir(src: str, dst: str) -> None:
    """Copy a directory tree between any two locations (local or URI)."""
    sfs, spath = _fs(src)
    dfs, dpath = _fs(dst)
    if isinstance(dfs, pafs.LocalFileSystem):
        Path(dpath).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)
