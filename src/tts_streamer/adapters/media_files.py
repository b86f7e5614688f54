"""The speech-file directory (``MEDIA_DIR``): flat, files named ``<sha1>.wav``, bounded by size, least
recently used first out, checked writable at start. Every filesystem call of the service runs in a
worker thread.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import attrs
import trio

from tts_streamer.exceptions import ConfigError

log = logging.getLogger(__name__)

GO_MEDIA_DIR = "/shared-data"  # where the Go service writes (fixed in its code; an emptyDir or volume)
_NAME: Final = re.compile(r"[0-9a-f]{40}\.wav")


def check_media_dir(directory: str | os.PathLike[str]) -> None:
    """Create ``directory`` if need be and prove the daemon can write files there, at start: a speech
    directory it cannot write makes every ``POST /v1/speeches`` fail, so it stops the daemon instead,
    naming MEDIA_DIR (a shared volume first created by the Go image, which ran as root, is the usual
    cause). Blocking: call in a thread."""
    path = Path(directory)
    probe = path / f".write-check-{uuid.uuid4().hex}.tmp"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"MEDIA_DIR={str(directory)!r}: the daemon (uid {os.getuid()}) cannot write speech files "
            f"there: {exc.strerror or exc}"
        ) from None
    if os.path.realpath(path) != os.path.realpath(GO_MEDIA_DIR) and os.path.isdir(GO_MEDIA_DIR):
        log.warning(
            "%s exists (the Go tts-manager's speech directory, served by its sidecar on port 80) but "
            "MEDIA_DIR is %s: if that sidecar still serves it, set MEDIA_DIR=%s and MEDIA_URL_PORT=80 "
            "(docs/migrating.md), or speech URLs point where it does not look",
            GO_MEDIA_DIR,
            directory,
            GO_MEDIA_DIR,
        )


@attrs.frozen
class CacheEntry:
    name: str
    size: int
    atime: float


class MediaCache:
    """The media directory: flat, files named ``<sha1>.wav``, bounded by size, LRU by access time.

    A hit (here or over HTTP) sets the file's access time explicitly, since filesystems mounted
    ``relatime``/``noatime`` would not. Every filesystem call runs in a worker thread.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.evicted = 0
        self._limiter = trio.CapacityLimiter(2)

    def path(self, name: str) -> Path:
        return self.directory / name

    async def setup(self) -> None:
        await trio.to_thread.run_sync(check_media_dir, self.directory)

    async def hit(self, name: str) -> bool:
        """True (and the file's access time bumped) when ``name`` is cached."""
        return await trio.to_thread.run_sync(self.touch, name, limiter=self._limiter)

    def touch(self, name: str) -> bool:
        path = self.path(name)
        try:
            stat = path.stat()
            os.utime(path, (time.time(), stat.st_mtime))
        except FileNotFoundError:
            return False
        return True

    async def store(self, name: str, data: bytes) -> None:
        await trio.to_thread.run_sync(self._store, name, data, limiter=self._limiter)

    def _store(self, name: str, data: bytes) -> None:
        tmp = self.directory / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as file:
                file.write(data)
            os.replace(tmp, self.path(name))  # readers see the whole file or none of it
        finally:
            tmp.unlink(missing_ok=True)
        self.evict(keep={name})

    def entries(self) -> list[CacheEntry]:
        found = []
        with os.scandir(self.directory) as it:
            for item in it:
                if not _NAME.fullmatch(item.name) or not item.is_file(follow_symlinks=False):
                    continue
                try:
                    stat = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append(CacheEntry(item.name, stat.st_size, stat.st_atime))
        return found

    def evict(self, keep: Iterable[str] = ()) -> list[str]:
        """Remove the least recently used files until the directory fits ``max_bytes``."""
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed: list[str] = []
        kept = set(keep)
        for entry in sorted(entries, key=lambda e: e.atime):
            if total <= self.max_bytes:
                break
            if entry.name in kept:
                continue
            try:
                self.path(entry.name).unlink()
            except FileNotFoundError:
                pass
            total -= entry.size
            removed.append(entry.name)
        if removed:
            self.evicted += len(removed)
            log.info("media cache: evicted %d file(s), %d bytes kept", len(removed), total)
        return removed
