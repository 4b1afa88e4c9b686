"""Rewrite requirements*.txt with the sha256 of every PyPI file pip could pick for each pin.

Usage: python scripts/hash_requirements.py [FILE ...]   (default: requirements.txt requirements-dev.txt
                                                        requirements-build.txt)

Reads each pinned line (`name==version`, an optional `; marker` kept), asks PyPI's JSON API
(https://pypi.org/pypi/<name>/json) for that version's files and keeps the sdist and every wheel
usable by CPython 3.11-3.13 on Linux x86_64, aarch64 or armv7l (the Pis and the CI machines), then
writes `--hash=sha256:...` lines under each pin. pip installs these files with --require-hashes,
so a substituted file from a mirror or a compromised index is refused. Comments and `-r` lines
are kept. Prints, per platform, the pins with no wheel there (they build from source, or come
from a Debian package: see README "Self-update").
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from pathlib import Path

PYPI_JSON = "https://pypi.org/pypi/{name}/json"
PYTHONS = ("cp311", "cp312", "cp313")
MACHINES = ("x86_64", "aarch64", "armv7l")
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;\\]+)\s*(;[^\\]*)?")
_MAX_JSON_BYTES = 50_000_000


def wheel_platforms(filename: str) -> set[str]:
    """The (python, machine) pairs of PYTHONS x MACHINES this wheel installs on; empty if none."""
    parts = filename[:-len(".whl")].split("-")
    if len(parts) < 5:
        return set()
    pys, abis, plats = (set(p.split(".")) for p in parts[-3:])
    fits = set()
    for py in PYTHONS:
        minor = int(py[3:])
        py_ok = bool({"py3", f"py3{minor}", py} & pys) or (
            "abi3" in abis and any(re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= minor for p in pys))
        abi_ok = bool({"none", "abi3", py} & abis)
        if not (py_ok and abi_ok):
            continue
        for machine in MACHINES:
            if "any" in plats or any(p.startswith(("manylinux", "musllinux", "linux")) and p.endswith(machine)
                                     for p in plats):
                fits.add(f"{py}-{machine}")
    return fits


def files_for(name: str, version: str) -> tuple[list[str], set[str], bool]:
    """(sha256 digests, platforms with a wheel, has an sdist) for name==version on PyPI. Raises OSError."""
    with urllib.request.urlopen(PYPI_JSON.format(name=name), timeout=60) as resp:
        data = json.loads(resp.read(_MAX_JSON_BYTES + 1))
    files = data.get("releases", {}).get(version)
    if not files:
        raise OSError(f"{name}=={version} is not on PyPI")
    digests, platforms, sdist = [], set(), False
    for f in files:
        if f.get("yanked"):
            continue
        fname = f["filename"]
        if f["packagetype"] == "sdist":
            sdist = True
        elif fname.endswith(".whl"):
            fits = wheel_platforms(fname)
            if not fits:
                continue
            platforms |= fits
        else:
            continue
        digests.append(f["digests"]["sha256"])
    return sorted(set(digests)), platforms, sdist


def rewrite(path: Path) -> list[str]:
    """Rewrite one requirements file in place; returns the warnings."""
    out, warnings = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("--hash") or (not stripped and out and out[-1].endswith("\\")):
            continue
        match = _PIN.match(line)
        if not match:
            out.append(line)
            continue
        name, version, marker = match.group(1), match.group(2), (match.group(3) or "").strip()
        digests, platforms, sdist = files_for(name, version)
        missing = sorted({f"{py}-{m}" for py in PYTHONS for m in MACHINES} - platforms)
        if missing and not marker:
            warnings.append(f"{path.name}: {name}=={version} has no wheel for {', '.join(missing)}"
                            f"{' (sdist only)' if sdist else ''}")
        head = f"{name}=={version}" + (f" {marker}" if marker else "")
        out.append(head + " \\")
        out += [f"    --hash=sha256:{d}" + (" \\" if i < len(digests) - 1 else "") for i, d in enumerate(digests)]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return warnings


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path,
                        default=[root / "requirements.txt", root / "requirements-dev.txt",
                                 root / "requirements-build.txt"])
    args = parser.parse_args(argv)
    for path in args.files:
        try:
            warnings = rewrite(path)
        except OSError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 1
        print(f"{path}: hashed")
        for w in warnings:
            print(f"  note: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
