"""Small files read without trusting them: a regular file only, opened without blocking, read with a bound.

A FIFO, a device or a directory put where a secret, a CA file or a state file belongs must neither hold the
caller (an open or a read that waits for a writer forever) nor feed it without end (/dev/zero). Standard
library only; no project imports.
"""
from __future__ import annotations

import os
import stat


class NotRegularFile(ValueError):
    """The path names a directory, a FIFO, a device or a socket. `mode`: its st_mode."""

    def __init__(self, path: str | os.PathLike[str], mode: int) -> None:
        super().__init__(f"{path} is not a regular file")
        self.mode = mode


class FileTooLarge(ValueError):
    """The file holds more than the caller's bound. `size`: its st_size when it was opened."""

    def __init__(self, path: str | os.PathLike[str], size: int, limit_bytes: int) -> None:
        super().__init__(f"{path} is larger than {limit_bytes} bytes")
        self.size = size


def read_regular(path: str | os.PathLike[str], limit_bytes: int, *, follow_links: bool = True) -> bytes:
    """The bytes of the regular file at `path`, at most `limit_bytes` of them.

    Raises what os.open raises (FileNotFoundError, PermissionError, OSError), NotRegularFile, and
    FileTooLarge also when the file grew past the bound after it was opened. `follow_links` False: a
    symbolic link is refused (ELOOP), for a root process reading a directory another user owns."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path, info.st_mode)
        if info.st_size > limit_bytes:
            raise FileTooLarge(path, info.st_size, limit_bytes)
        data = os.read(fd, limit_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > limit_bytes:
        raise FileTooLarge(path, len(data), limit_bytes)
    return data
