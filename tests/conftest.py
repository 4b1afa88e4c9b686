"""Shared fixtures: a fake clock (tests never sleep for real) and the project on sys.path."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class FakeClock:
    """Monotonic seconds that only move when told; `sleep` and `wait` advance it."""

    def __init__(self, start: float = 1000.0, wall_start_s: float = 1_780_000_000.0) -> None:
        self.now = start
        self.wall_offset = wall_start_s - start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 0.0)

    def wait(self, seconds: float) -> bool:
        self.sleep(seconds)
        return False

    def wall_ms(self) -> int:
        return round((self.now + self.wall_offset) * 1000)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
