"""OS file locks (``filelock``) shared by processes that must not do one thing twice at once: building a teacher
cache, training a study's run. The OS releases a lock when its process ends, kill -9 included."""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout


def try_lock(path: str | Path) -> FileLock | None:
    """The lock on ``path``, acquired now, or None when another process holds it (never waits)."""
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def held_elsewhere(path: str | Path) -> bool:
    """Whether another process holds the lock on ``path`` (a file that does not exist is not held; nothing written)."""
    if not Path(path).is_file():
        return False
    lock = try_lock(path)
    if lock is None:
        return True
    lock.release()
    return False


__all__ = ["held_elsewhere", "try_lock"]
