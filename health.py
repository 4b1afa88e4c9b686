"""The Pi's own health for each cycle: load, temperature, memory, disk, network, uptime and the firmware's
power flags (under-voltage, throttling), read cheaply (procfs.py's kept-open files) with psutil as the
fallback. No other project imports.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from procfs import KeptFile, cpu_percent, cpu_ticks, free_bytes, memory_used_bytes, net_bytes


# The Raspberry Pi firmware's under-voltage and throttling flags (`vcgencmd get_throttled` shows the same
# word): a solar model's Pi often runs on a weak supply. The kernel exposes the word as a hex sysfs file,
# and the under-voltage bit alone through the `rpi_volt` hwmon device (the interface newer kernels keep).
THROTTLED_PATH = "/sys/devices/platform/soc/soc:firmware/get_throttled"
HWMON_DIR = "/sys/class/hwmon"
THERMAL_PATH = "/sys/class/thermal/thermal_zone0/temp"  # the SoC's temperature in millidegrees C (a Pi's cpu-thermal)
_CPU_HWMON_NAMES = ("cpu_thermal", "coretemp", "k10temp", "soc_thermal")
_UNDERVOLTAGE_NOW = 1 << 0
_THROTTLED_NOW = (1 << 1) | (1 << 2) | (1 << 3)  # frequency capped, throttled, soft temperature limit
_UNDERVOLTAGE_SINCE_BOOT = 1 << 16
_THROTTLED_SINCE_BOOT = (1 << 17) | (1 << 18) | (1 << 19)


@dataclass(frozen=True)
class PowerFlags:
    """The Pi's own power as its firmware reports it; None = this Pi does not say."""

    undervoltage: bool | None = None  # the supply is below ~4.63 V now
    throttled: bool | None = None  # the CPU is throttled or its frequency capped now
    undervoltage_since_boot: bool | None = None
    throttled_since_boot: bool | None = None


class PowerFlagReader:
    """Reads PowerFlags cheaply (one small sysfs read per call); paths injectable for tests. Prefers the
    firmware's get_throttled word (every flag); else the `rpi_volt` hwmon alarm (under-voltage only); off a
    Pi, no flags. Where each source lives is looked up once. Not thread-safe."""

    def __init__(self, throttled_path: str = THROTTLED_PATH, hwmon_dir: str = HWMON_DIR) -> None:
        self._throttled_path = throttled_path if os.path.isfile(throttled_path) else None
        self._alarm_path = None if self._throttled_path else _rpi_volt_alarm(hwmon_dir)

    @property
    def available(self) -> bool:  # True when this machine reports any of the flags
        return bool(self._throttled_path or self._alarm_path)

    def read(self) -> PowerFlags:
        """The flags now; a source that cannot be read gives PowerFlags() (all None)."""
        if self._throttled_path:
            text = _read_small(self._throttled_path)
            try:
                word = int(text.strip(), 16) if text is not None else None
            except ValueError:  # not a hex word
                word = None
            if word is None:
                return PowerFlags()
            return PowerFlags(bool(word & _UNDERVOLTAGE_NOW), bool(word & _THROTTLED_NOW),
                              bool(word & _UNDERVOLTAGE_SINCE_BOOT), bool(word & _THROTTLED_SINCE_BOOT))
        if self._alarm_path:
            text = _read_small(self._alarm_path)
            if text is not None and text.strip() in ("0", "1"):
                return PowerFlags(undervoltage=text.strip() == "1")
        return PowerFlags()


def _read_small(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(64).decode("ascii", "replace")  # a sysfs value: a few bytes; never read more
    except OSError:
        return None


def _hwmon_file(hwmon_dir: str, names: tuple[str, ...], file: str) -> str | None:
    """`file` of the first hwmon device (in `names`' order of preference) whose `name` is one of `names`, or
    None. Looked up once: the devices are listed and their names read."""
    try:
        entries = sorted(os.listdir(hwmon_dir))
    except OSError:
        return None
    found = {entry: (_read_small(os.path.join(hwmon_dir, entry, "name")) or "").strip() for entry in entries}
    for wanted in names:
        for entry, name in found.items():
            path = os.path.join(hwmon_dir, entry, file)
            if name == wanted and os.path.isfile(path):
                return path
    return None


def _rpi_volt_alarm(hwmon_dir: str) -> str | None:
    return _hwmon_file(hwmon_dir, ("rpi_volt",), "in0_lcrit_alarm")


@dataclass(frozen=True)
class SystemReading:
    """The Pi's health for one cycle. The power flags are None where the Pi does not report them."""

    cpu_percent: float
    cpu_temp_c: float | None
    memory_used_mb: float
    disk_free_mb: float
    net_sent_bytes: int
    net_recv_bytes: int
    uptime_s: float
    undervoltage: bool | None = None
    throttled: bool | None = None
    undervoltage_since_boot: bool | None = None
    throttled_since_boot: bool | None = None


class SystemMonitor:
    """The Pi's health readings and the firmware's power flags; network bytes are counted since the last call.

    CPU load, memory and network come from /proc/stat, /proc/meminfo and /proc/net/dev under `proc_dir`,
    kept open and re-read each cycle (the values psutil gives, at a fraction of its cost); where one
    cannot be read, psutil (`psutil_module`) reads it. `power` reads the flags (default: a
    PowerFlagReader on this machine's sysfs). The CPU temperature is one small file read a cycle:
    `thermal_path` (millidegrees C) where it exists, else the first CPU temperature file of the hwmon
    devices under `hwmon_dir`, looked up once (none: cpu_temp_c None). Not thread-safe.
    """

    # /proc/net/dev holds a ~130-byte line per interface: 16 KiB is room for over a hundred.
    _NET_DEV_LIMIT_BYTES = 16384

    def __init__(self, disk_path: str, psutil_module=None, *, power: PowerFlagReader | None = None,
                 thermal_path: str = THERMAL_PATH, hwmon_dir: str = HWMON_DIR, proc_dir: str = "/proc") -> None:
        if psutil_module is None:
            import psutil as psutil_module
        self._psutil = psutil_module
        self._disk_path = disk_path
        self._power = power if power is not None else PowerFlagReader()
        temp_path = thermal_path if os.path.isfile(thermal_path) else _cpu_hwmon_temp(hwmon_dir)
        self._temp = KeptFile(temp_path, 64) if temp_path else None
        self._stat = KeptFile(os.path.join(proc_dir, "stat"), 1024)
        self._meminfo = KeptFile(os.path.join(proc_dir, "meminfo"), 8192)
        self._net_dev = KeptFile(os.path.join(proc_dir, "net", "dev"), self._NET_DEV_LIMIT_BYTES)
        self._ticks = self._cpu_ticks()
        self._net = self._net_counters()

    def close(self) -> None:
        """Close the files kept open (idempotent)."""
        for kept in (self._temp, self._stat, self._meminfo, self._net_dev):
            if kept is not None:
                kept.close()

    def _cpu_ticks(self) -> tuple[int, ...] | None:
        text = self._stat.read()
        ticks = cpu_ticks(text) if text else None
        if ticks is None:
            self._psutil.cpu_percent(interval=None)  # psutil keeps its own previous reading: prime it
        return ticks

    def _cpu_percent(self) -> float:
        before, self._ticks = self._ticks, self._cpu_ticks()
        if before is None or self._ticks is None or len(before) != len(self._ticks):
            return float(self._psutil.cpu_percent(interval=None))
        return cpu_percent(before, self._ticks)

    def _memory_used_bytes(self) -> int:
        text = self._meminfo.read()
        used = memory_used_bytes(text) if text else None
        return used if used is not None else self._psutil.virtual_memory().used

    def _net_counters(self) -> tuple[int, int]:
        text = self._net_dev.read()
        counted = net_bytes(text) if text and len(text) < self._NET_DEV_LIMIT_BYTES else None
        if counted is not None:
            return counted
        counters = self._psutil.net_io_counters()
        return (counters.bytes_sent, counters.bytes_recv) if counters else (0, 0)

    def read(self) -> SystemReading:
        # First, before any counter moves on: a store directory that cannot be read (OSError) loses no
        # network bytes or CPU ticks, the next good reading carries them.
        disk_free_mb = free_bytes(self._disk_path) / 1_048_576
        sent, recv = self._net_counters()
        # Counters can wrap or reset (interface down/up): never report a negative delta.
        delta = (max(sent - self._net[0], 0), max(recv - self._net[1], 0))
        self._net = (sent, recv)
        flags = self._power.read()
        return SystemReading(
            cpu_percent=self._cpu_percent(),
            cpu_temp_c=self._cpu_temp(),
            memory_used_mb=self._memory_used_bytes() / 1_048_576,
            disk_free_mb=disk_free_mb,
            net_sent_bytes=delta[0],
            net_recv_bytes=delta[1],
            uptime_s=_uptime_s(self._psutil),
            undervoltage=flags.undervoltage,
            throttled=flags.throttled,
            undervoltage_since_boot=flags.undervoltage_since_boot,
            throttled_since_boot=flags.throttled_since_boot,
        )

    def _cpu_temp(self) -> float | None:
        if self._temp is None:
            return None
        text = self._temp.read()
        try:
            value = int(text.strip()) / 1000 if text else None
        except ValueError:
            return None
        return value if value is not None and -60 <= value <= 150 else None  # else not a CPU's temperature


def _cpu_hwmon_temp(hwmon_dir: str) -> str | None:
    """The temp1_input of the first hwmon device named like a CPU sensor, or None."""
    return _hwmon_file(hwmon_dir, _CPU_HWMON_NAMES, "temp1_input")


def _uptime_s(ps) -> float:
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.time() - ps.boot_time()
