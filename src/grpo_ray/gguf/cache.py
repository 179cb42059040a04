"""The node's build cache: one directory per source file's sha256, built once under a file lock.

Concurrent callers (Ray trials on one node) serialize on a lock file next to the target; the
first builds into a temporary directory and renames it into place, so nobody ever sees a
half-written directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

# Bump when the layout or content of a materialized directory changes: a cached directory with
# another format is rebuilt instead of silently reused.
FORMAT_VERSION = 1

# What a complete cache entry holds: its source's sha256 and FORMAT_VERSION (cached_build checks it).
SOURCE_FILE = "grpo_ray_source.json"


# --------------------------------------------------------------------------------------------
# Cache: sha256 key, file lock, atomic rename
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | Path, chunk_size: int = 8 << 20) -> str:
    """The hex sha256 of a file, read in chunks (GGUFs are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def default_cache_root() -> Path:
    """``$GRPO_RAY_CACHE`` or ``~/.cache/grpo-ray`` (shared with the builtin tiny model)."""
    return Path(os.environ.get("GRPO_RAY_CACHE") or Path.home() / ".cache" / "grpo-ray")


def cached_sha256(path: Path, gguf_root: Path) -> str:
    """sha256 of ``path``, memoized by (real path, size, mtime, inode).

    Hashing a multi-GB GGUF takes seconds; every trial resolves the model, so remember it.
    The memo is only a shortcut: a changed file has another stat and is hashed again.
    """
    st = path.stat()
    real = str(path.resolve())
    stamp = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    memo = gguf_root / ".sha256-memo" / (hashlib.sha1(real.encode()).hexdigest() + ".json")
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(memo.read_text())
        if all(saved.get(k) == v for k, v in stamp.items()) and len(saved.get("sha256", "")) == 64:
            return str(saved["sha256"])
    sha = file_sha256(path)
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "sha256": sha}))
        os.replace(tmp, memo)
    return sha


def _is_complete(target: Path, sha: str) -> bool:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((target / SOURCE_FILE).read_text())
        return info.get("gguf_sha256") == sha and info.get("format_version") == FORMAT_VERSION
    return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``path``: one builder per node, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def cached_build(target: Path, sha: str, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it with ``build(tmp_dir)`` once if it is not complete.

    Concurrent callers (Ray trials on one node) serialize on a lock file next to ``target``;
    the first builds into a temporary directory beside it and renames it into place, so nobody
    ever sees a half-written directory, and the others find it complete once they get the lock.
    ``build`` must write ``SOURCE_FILE`` with ``gguf_sha256`` and ``format_version``.
    """
    if _is_complete(target, sha):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, sha):  # built by another process while we waited
            return target
        for stale in target.parent.glob(f".tmp-{target.name}-*"):  # a builder that died; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            build(tmp)
            if not _is_complete(tmp, sha):
                raise RuntimeError(f"build of {target} did not write a valid {SOURCE_FILE}")
            if target.exists():  # older format or damaged: move aside, then swap in
                old = target.parent / f".tmp-{target.name}-old-{os.getpid()}"
                os.rename(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


