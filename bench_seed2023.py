"""The 2023 SolarPowerBrampton upload path, re-created for bench.py as the baseline.

What the original code did each loop (its main.py and tools.py, cloud path): read the network counters,
write `network` upload/download; read CPU and RAM, write `cpu_usage` CPU and `ram_usage` RAM; construct
and configure an INA219 at 0x40, 0x41, 0x44 and (its bug) 0x44 again, read each 10 times (voltage twice
and shunt voltage once per sample), average, add `bus_average`; then one synchronous influxdb-client
write per field of `Electricity Gen` with a `House` tag. 18 requests per cycle, no timestamps (the
server stamps them), precision ns.

Kept as it was: the request and field layout, the sensor reads, the per-field synchronous writes, the
client library. Changed so it runs here: the adafruit driver over the emulated bus stands in for the
pi-ina219 driver over smbus, statistics.fmean for numpy.average (numpy is not installed), and the sleeps
(0.1 s per sample, 1 s in psutil.cpu_percent, 10 s per loop) are shortened by arguments: sleeping costs
no CPU. Prints "cycle N" after every cycle, so bench.py can sample /proc between cycles.

    python bench_seed2023.py URL --cycles N --interval-s 0.25 [--replay]
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# The 2023 layout: (measurement, tag key, tag value, field) in the order the loop wrote them.
ADDRESSES = {"blue house": 0x44, "red house": 0x40, "green house": 0x41, "bus": 0x44}
MEASUREMENT = "Electricity Gen"
TAG = "House"


def requests_per_cycle() -> list[tuple[str, str, str]]:
    """(measurement, tag value, field) of each of the 18 requests of one 2023 cycle, in order."""
    host = socket.gethostname()
    layout = [("network", host, "upload"), ("network", host, "download"),
              ("cpu_usage", host, "CPU"), ("ram_usage", host, "RAM")]
    for house in ADDRESSES:
        layout += [(MEASUREMENT, house, field) for field in ("voltage", "power", "bus_voltage")]
    layout += [(MEASUREMENT, "bus_average", "voltage"), (MEASUREMENT, "bus_average", "power")]
    return layout


class Seed2023:
    """One 2023 loop per `cycle()`: sensors, Pi health, 18 synchronous writes. Not thread-safe."""

    def __init__(self, bus, write_api, *, bucket: str = "Solar Power", org: str = "B2Z",
                 sample_sleep_s: float = 0.1, cpu_interval_s: float = 1.0) -> None:
        import psutil

        self.bus = bus
        self.write_api = write_api
        self.bucket = bucket
        self.org = org
        self.sample_sleep_s = sample_sleep_s
        self.cpu_interval_s = cpu_interval_s
        self._psutil = psutil
        self._net = (0.0, 0.0)
        self._nic = "eth0" if "eth0" in psutil.net_io_counters(pernic=True) else None

    def measure_network(self) -> tuple[float, float]:
        stats = self._psutil.net_io_counters(pernic=True)
        nic = stats[self._nic] if self._nic else self._psutil.net_io_counters()
        return nic.bytes_recv, nic.bytes_sent

    def read_ina219(self, ina) -> dict[str, float]:
        power, bus_voltage, shunt_voltage = [], [], []
        for _ in range(10):
            try:
                power.append(round(0.1 * (ina.bus_voltage ** 2), 3))  # the 2023 formula (a bug: not V*I)
                bus_voltage.append(round(ina.bus_voltage, 3))
                shunt_voltage.append(round(ina.shunt_voltage, 4))
            except Exception:  # noqa: BLE001 - as in 2023: a failed sample is skipped
                print("Error encountered when measuring voltage", file=sys.stderr)
            time.sleep(self.sample_sleep_s)
        return {"voltage": float(statistics.fmean(shunt_voltage)), "power": float(statistics.fmean(power)),
                "bus_voltage": float(statistics.fmean(bus_voltage))}

    def measure(self) -> dict[str, dict[str, float]]:
        import adafruit_ina219

        # As in 2023: a new driver object (probe, configure, calibrate) for every sensor on every loop.
        data = {house: self.read_ina219(adafruit_ina219.INA219(self.bus, address))
                for house, address in ADDRESSES.items()}
        bus_voltage = sum(d["bus_voltage"] for d in data.values()) / 3  # sic: 4 entries divided by 3
        data["bus_average"] = {"voltage": float(round(bus_voltage, 3)),
                               "power": float(round(0.1 * (bus_voltage ** 2), 3))}
        return data

    def _write(self, measurement: str, tag_key: str, tag_value: str, field: str, value: float) -> None:
        import influxdb_client

        point = influxdb_client.Point(measurement).tag(tag_key, tag_value).field(field, value)
        try:
            self.write_api.write(bucket=self.bucket, org=self.org, record=point)
        except Exception as err:  # noqa: BLE001 - as in 2023: print and go on
            print(f"write failed: {err}", file=sys.stderr)

    def cycle(self) -> None:
        net_in, net_out = self.measure_network()
        net_in = (net_in - self._net[0]) / 1024 / 1024
        net_out = (net_out - self._net[1]) / 1024 / 1024
        self._net = self.measure_network()
        host = socket.gethostname()
        for name, value in (("upload", float(net_in)), ("download", float(net_out))):
            self._write("network", "Machine", host, name, value)
        cpu = self._psutil.cpu_percent(self.cpu_interval_s) * 100.0
        ram = self._psutil.virtual_memory().percent * 10.0
        host = socket.gethostname()
        for measurement, field, value in (("cpu_usage", "CPU", cpu), ("ram_usage", "RAM", ram)):
            self._write(measurement, "Machine", host, field, value)
        for house, fields in self.measure().items():
            for name, value in fields.items():
                self._write(MEASUREMENT, TAG, house, name, float(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the 2023 upload path, for bench.py")
    parser.add_argument("url")
    parser.add_argument("--cycles", type=int, required=True)
    parser.add_argument("--interval-s", type=float, default=0.25)
    parser.add_argument("--sample-sleep-s", type=float, default=0.001)
    parser.add_argument("--cpu-interval-s", type=float, default=0.01)
    parser.add_argument("--replay", action="store_true", help="replay the emulated chip's registers")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS

    import config as config_mod
    from bench_proc import ReplayBus
    from simulator import build_simulated_bus

    cfg = config_mod.parse_config({"simulation": {"enabled": True, "scenario": "constant"}}, "seed2023")
    bus = build_simulated_bus(cfg, time.monotonic)
    client = InfluxDBClient(url=args.url, token="bench", org="B2Z")
    seed = Seed2023(ReplayBus(bus) if args.replay else bus, client.write_api(write_options=SYNCHRONOUS),
                    sample_sleep_s=args.sample_sleep_s, cpu_interval_s=args.cpu_interval_s)
    start = time.monotonic()
    for n in range(1, args.cycles + 1):
        seed.cycle()
        print(f"cycle {n}", flush=True)
        time.sleep(max(0.0, start + n * args.interval_s - time.monotonic()))
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
