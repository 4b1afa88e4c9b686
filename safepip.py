"""Install a release's requirements without letting a package index run code as root.

Standard library only, no project imports: updater.py imports it and install.sh runs it
(`python -I safepip.py VENV_PYTHON REQUIREMENTS`).

- Every requirement must carry `--hash=sha256:...` (checked before pip runs: a release
  without hashes is refused) and pip runs with --require-hashes, so a file substituted by a
  mirror or an index is refused.
- As root, pip installs wheels only (--only-binary :all:): installing a wheel runs no code.
  Pins that exist only as source (sdist) are built first by an unprivileged user (`pip wheel`,
  the sdist's hash checked), and root installs the built wheels with --no-index --no-deps: one
  per source-only pin, named as the pin, nothing else the build left.
- What that build runs is checked too: pip's build isolation would fetch setuptools (and an sdist's
  setup_requires) unchecked, so the build runs without it, in a venv of its own holding only the
  hash-pinned tools of requirements-build.txt (beside the requirements); pip may fetch nothing else.
- The build runs as an identity of its own (BUILD_USER, or the unused BUILD_UID), never the shared
  `nobody`: no other process on the Pi runs as it, so none can reach into the build.
- A built wheel is installed only when every entry is the distribution's own (named as it, no .pth
  file, no .data directory); root's own Python runs with -S besides (the units), so site-packages is
  never read as root.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

BUILD_USER = "spb-build"  # source builds only: a system user (install.sh) with no home, no shell, no other process
BUILD_UID = 65533  # ... or, where it does not exist (a Pi updated into this release), this unused uid and gid
# What the unprivileged build keeps of the caller's environment: an sdist's build code runs there, so no
# secret (a token or password in any variable) may reach it; pip's own settings and proxies are kept.
_BUILD_ENV_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "SOURCE_DATE_EPOCH", "http_proxy", "https_proxy",
                              "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"})
_HASH = re.compile(r"--hash[= ]sha256:([0-9a-f]{64})\b")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;\\]+)")
BUILD_REQUIREMENTS = "requirements-build.txt"  # the build tools' pins, beside the requirements file
_MAX_REQ_BYTES = 1_000_000


class HashError(Exception):
    """The requirements are not fully hash-pinned; the message names the file and the line."""


def _logical_lines(path: Path) -> list[tuple[int, str]]:
    data = path.read_bytes()[:_MAX_REQ_BYTES + 1]
    if len(data) > _MAX_REQ_BYTES:
        raise HashError(f"{path}: larger than {_MAX_REQ_BYTES} bytes")
    out, buf, start = [], "", 0
    for number, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        line = raw.split(" #", 1)[0] if not raw.lstrip().startswith("#") else ""
        if not buf:
            start = number
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append((start, buf.strip()))
        buf = ""
    if buf.strip():
        out.append((start, buf.strip()))
    return out


def _requirement_lines(path: Path, _seen: frozenset[Path] = frozenset()) -> Iterator[tuple[str, str]]:
    """(where: "file:line", logical line) of every line of `path` and of the files it includes with -r or
    --requirement, in order. A file that includes itself (directly or through others) is not read again."""
    path = Path(path)
    if path.resolve() in _seen:
        return
    for number, line in _logical_lines(path):
        if line.startswith(("-r", "--requirement ")):
            name = line.split(None, 1)[1] if " " in line else line[2:]
            yield from _requirement_lines(path.parent / name.strip(), _seen | {path.resolve()})
        else:
            yield f"{path}:{number}", line


def allowed_hashes(path: Path) -> set[str]:
    """Every sha256 in `path` (and the files it includes with -r). Raises HashError if any
    requirement has none, or if an option could fetch unpinned code (-e, URLs, --index-url)."""
    hashes: set[str] = set()
    for where, line in _requirement_lines(path):
        if line.startswith("-"):
            # -e/--editable, --index-url, --extra-index-url, -f, -c ...: none belongs in a release's file.
            raise HashError(f"{where}: option {line.split()[0]!r} is not allowed in a hashed requirements file")
        found = _HASH.findall(line)
        if not found:
            raise HashError(f"{where}: {line.split()[0]} has no --hash=sha256:... "
                            "(regenerate with: python scripts/hash_requirements.py)")
        if "://" in line.split("--hash")[0] or " @ " in line:
            raise HashError(f"{where}: a URL requirement is not allowed")
        hashes.update(found)
    return hashes


def pins(path: Path) -> dict[str, str]:
    """Normalised name -> version of every `name==version` line of `path` (and its -r files)."""
    return {_normalise(match[1]): match[2] for _, line in _requirement_lines(path) if (match := _PIN.match(line))}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _wheel_pin(filename: str) -> tuple[str, str] | None:
    """(normalised name, version) of a wheel file's name, None if it is not one."""
    parts = filename[:-len(".whl")].split("-") if filename.endswith(".whl") else []
    return (_normalise(parts[0]), parts[1]) if len(parts) >= 5 else None


def unsafe_member(wheel: Path, name: str) -> str | None:
    """The first entry of `wheel`, built from the source of distribution `name`, that root must not install,
    or None: a .pth file (code run at every start of the venv's Python), a .data directory (files put
    outside the package), or anything not named as the distribution (a `pip/__init__.py` would replace
    the pip root runs next). Raises zipfile.BadZipFile."""
    own = name.replace("-", "_").lower()
    with zipfile.ZipFile(wheel) as archive:
        for entry in archive.namelist():
            top = entry.split("/", 1)[0]
            module = top.split(".", 1)[0].lower()
            dist_info = top.lower().endswith(".dist-info") and top.lower().startswith(own + "-")
            if entry.endswith(".pth") or top.endswith(".data") or not (dist_info or module == own):
                return entry
    return None


def build_identity(name: str = BUILD_USER) -> tuple[int, int]:
    """(uid, gid) source builds run as: the user `name` (install.sh makes it), else BUILD_UID, an id no
    account has (the updater's sandbox cannot add users: /etc is read-only there), so no other process on
    the Pi runs as it. Raises KeyError when BUILD_UID belongs to an account after all."""
    try:
        user = pwd.getpwnam(name)
        return user.pw_uid, user.pw_gid
    except KeyError:
        pass
    try:
        taken = pwd.getpwuid(BUILD_UID)
    except KeyError:
        return BUILD_UID, BUILD_UID
    raise KeyError(f"no user {name!r}, and uid {BUILD_UID} is {taken.pw_name!r}'s: no build identity")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip(python: str) -> list[str]:
    # -I: no user site, no PYTHON* variables, no current directory on sys.path.
    return [python, "-I", "-m", "pip", "--disable-pip-version-check", "--no-input"]


def _build_env(base: dict[str, str]) -> dict[str, str]:
    """Only the variables a build needs (_BUILD_ENV_NAMES, LC_*, PIP_*)."""
    return {k: v for k, v in base.items() if k in _BUILD_ENV_NAMES or k.startswith(("LC_", "PIP_"))}


def _run(cmd: Sequence[str], env: dict[str, str], timeout: float, user: tuple[int, int] | None = None,
         cwd: str | None = None) -> None:
    """Run `cmd` (as `user`, (uid, gid)) in a process group of its own: on timeout the whole group is killed
    (a compiler or a build backend pip started, too), then TimeoutExpired is raised. Its output goes to a
    file, not a pipe: a child that left the group (setsid) and kept the pipe would make us wait for it."""
    kwargs = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
    with tempfile.TemporaryFile("w+", errors="replace") as out:
        proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if proc.returncode != 0:
            out.seek(max(out.seek(0, os.SEEK_END) - 8192, 0))  # the tail is what says why
            tail = " | ".join(out.read().strip().splitlines()[-12:])
            raise subprocess.CalledProcessError(proc.returncode, cmd, tail)


def install(python: str, requirements: Path, *, extra_args: Sequence[str] = (), timeout: float = 3600.0,
            build_user: str = BUILD_USER, env: dict[str, str] | None = None,
            build_requirements: Path | None = None) -> None:
    """pip install -r `requirements` into the venv of `python`, hash-checked.

    `build_requirements`: the hash-pinned tools source-only pins are built with (default: BUILD_REQUIREMENTS
    beside `requirements`; a missing file: none, so only an sdist that needs nothing beyond the build venv's
    own pip builds). `extra_args` go to every pip run (an index, say). Raises HashError (not hashed),
    subprocess.CalledProcessError (pip failed; its output tail in .output), subprocess.TimeoutExpired,
    KeyError (no build user).
    """
    requirements = Path(requirements).absolute()
    allowed = allowed_hashes(requirements)
    tools = Path(build_requirements or requirements.parent / BUILD_REQUIREMENTS).absolute()
    if tools.exists():
        allowed_hashes(tools)  # the build tools are hash-pinned too
    base = dict(os.environ if env is None else env)
    for name in list(base):
        if name.startswith("PYTHON"):
            del base[name]
    if os.geteuid() != 0:
        _run(_pip(python) + ["install", "--require-hashes", "-r", str(requirements), *extra_args], base, timeout)
        return
    user = build_identity(build_user)
    work = Path(tempfile.mkdtemp(prefix="spb-pip-"))
    os.chmod(work, 0o711)  # the build user may pass through to its directory, not list what is here
    try:
        hidden = work / secrets.token_hex(16)  # /tmp is listed by all: the build's path is not
        hidden.mkdir(mode=0o711)
        build = hidden / "build"
        build.mkdir()
        os.chown(build, *user)
        # 1. As the unprivileged user: a build venv with only the hash-pinned build tools, then fetch every
        #    pin (hash-checked) and build the source-only ones there, without build isolation (which would
        #    fetch unchecked build tools) and with no way to fetch anything else.
        build_env = dict(_build_env(base), HOME=str(build), TMPDIR=str(build), PIP_CACHE_DIR=str(build / "cache"))
        _run([python, "-I", "-m", "venv", str(build / "venv")], build_env, timeout, user=user, cwd=str(build))
        build_python = str(build / "venv" / "bin" / "python")
        if tools.exists():
            _run(_pip(build_python) + ["install", "--require-hashes", "--only-binary", ":all:", "-r", str(tools),
                                       *extra_args], build_env, timeout, user=user, cwd=str(build))
        _run(_pip(build_python) + ["wheel", "--require-hashes", "--no-deps", "--no-build-isolation", "-r",
                                   str(requirements), "-w", str(build / "wheels"), *extra_args],
             build_env, timeout, user=user, cwd=str(build))
        # 2. Root copies what was built from source into a directory only root can write, then installs those
        #    wheels (installing a wheel runs no code): one per pinned name and version, nothing else.
        local = work / "local"
        local.mkdir(mode=0o700)
        wanted = pins(requirements)
        taken: set[str] = set()
        for wheel in sorted((build / "wheels").glob("*.whl")):
            pin = _wheel_pin(wheel.name)
            if not wheel.is_file() or wheel.is_symlink() or pin is None or wanted.get(pin[0]) != pin[1] \
                    or pin[0] in taken:
                continue  # not a wheel of a pinned name and version (or a second one): never installed
            copy = local / wheel.name
            shutil.copyfile(wheel, copy)
            if _sha256(copy) in allowed:
                copy.unlink()  # a file from the index: step 3 fetches and checks it again
                continue
            try:
                unsafe = unsafe_member(copy, pin[0])
            except zipfile.BadZipFile:
                unsafe = "(not a zip file)"
            if unsafe is not None:
                raise HashError(f"the wheel built from {pin[0]}=={pin[1]}'s source holds {unsafe!r}: refused "
                                "(a .pth file or a .data directory is never installed as root)")
            taken.add(pin[0])  # built here from a hash-checked sdist
        built = sorted(str(p) for p in local.glob("*.whl"))
        if built:
            _run(_pip(python) + ["install", "--no-index", "--no-deps", "--only-binary", ":all:", *built],
                 dict(base, HOME=str(work)), timeout, cwd=str(work))
        # 3. Root: the rest, wheels only, every file's hash checked.
        _run(_pip(python) + ["install", "--require-hashes", "--only-binary", ":all:", "-r", str(requirements),
                             *extra_args], dict(base, HOME=str(work)), timeout, cwd=str(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -I safepip.py VENV_PYTHON REQUIREMENTS [PIP_ARGS...]", file=sys.stderr)
        return 2
    try:
        install(args[0], Path(args[1]), extra_args=args[2:])
    except HashError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"error: pip failed (exit {exc.returncode}): {exc.output}", file=sys.stderr)
        return 1
    except (OSError, KeyError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
