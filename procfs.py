"""The Pi's load, memory, network and free space from the kernel, read cheaply every cycle.

`KeptFile` keeps a procfs/sysfs file open and reads it again from offset 0 (one system call, not three);
the parsers turn /proc/stat, /proc/meminfo and /proc/net/dev into the figures psutil gives for them
(cpu_percent, virtual_memory().used, net_io_counters()), at about a quarter of psutil's cost; free_bytes is
psutil.disk_usage().free from one statvfs.
Standard library only; no project imports.
"""
from __future__ import annotations

import os


class KeptFile:
    """A small kernel file (procfs, sysfs) kept open and read again from offset 0 (one pread per read,
    not open/read/close; the kernel produces the text afresh on every read from offset 0).

    `limit_bytes` bounds each read. A file that cannot be opened or read gives None (and is opened
    again at the next read). Not thread-safe.
    """

    def __init__(self, path: str, limit_bytes: int = 4096) -> None:
        self.path = path
        self.limit_bytes = limit_bytes
        self._fd: int | None = None

    def read(self) -> bytes | None:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return os.pread(self._fd, self.limit_bytes, 0)
        except OSError:
            self.close()
            return None

    def close(self) -> None:
        """Close the file (idempotent); a later read opens it again."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    __del__ = close  # a raw descriptor is not closed by the garbage collector on its own


def _kb_field(text: bytes, key: bytes) -> int | None:
    """The number after `key` in /proc/meminfo's text (kB), or None."""
    i = text.find(key)
    if i < 0:
        return None
    try:
        return int(text[i + len(key):text.find(b"\n", i)].split()[0])
    except (ValueError, IndexError):
        return None


def memory_used_bytes(meminfo: bytes) -> int | None:
    """Memory in use from /proc/meminfo's text as psutil counts it (MemTotal - MemAvailable), or None
    when MemAvailable is missing or out of range (psutil then estimates: the caller asks it)."""
    total = _kb_field(meminfo, b"MemTotal:")
    available = _kb_field(meminfo, b"MemAvailable:")
    if total is None or not available or available > total:
        return None
    return (total - available) * 1024


def cpu_ticks(stat: bytes) -> tuple[int, ...] | None:
    """The system-wide CPU times from /proc/stat's first line (user, nice, system, idle, iowait, irq,
    softirq, steal, guest, guest_nice: as many as the kernel gives), in clock ticks; None if unreadable."""
    line = stat[:stat.find(b"\n")]
    fields = line.split()
    if len(fields) < 5 or fields[0] != b"cpu":
        return None
    try:
        return tuple(int(x) for x in fields[1:11])
    except ValueError:
        return None


def cpu_percent(before: tuple[int, ...], after: tuple[int, ...]) -> float:
    """Busy share of all CPU time between two cpu_ticks() readings, %, one decimal: psutil's
    cpu_percent (guest time is already in user/nice; idle and iowait are not busy; a counter that went
    backwards counts 0)."""
    deltas = [max(b - a, 0) for a, b in zip(before, after)]
    total = sum(deltas) - sum(deltas[8:10])
    busy = total - deltas[3] - deltas[4]
    return round(busy / total * 100, 1) if total > 0 else 0.0


def net_bytes(net_dev: bytes) -> tuple[int, int] | None:
    """(sent, received) bytes summed over every interface in /proc/net/dev's text, or None if unreadable."""
    sent = recv = 0
    try:
        for line in net_dev.splitlines()[2:]:
            fields = line[line.rindex(b":") + 1:].split()
            recv += int(fields[0])
            sent += int(fields[8])
    except (ValueError, IndexError):
        return None
    return sent, recv


def free_bytes(path: str) -> int:
    """Bytes free for an unprivileged user on the file system holding `path` (what psutil.disk_usage().free
    gives, without its other figures). Raises OSError."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
