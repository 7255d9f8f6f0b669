"""Native kernels: C++ sources beside this file, compiled on first use with the machine's C++ compiler.

Why not a built extension: the kernels include no Python or torch headers (plain C functions over
pointers, called through ``ctypes``), so one compiler call takes ~2 s, needs no build step at install
time, and a machine without a compiler simply keeps the torch engine. ``-march=native`` tunes the code to
this CPU, so the library is cached per source, compiler, flags and CPU under ``$BNREPRO_CACHE/native``.
``defined`` builds a variant of a kernel with extra macros, for measurement; each variant is cached apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from bnrepro.runs import cache_dir

SOURCES = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread"]
DEFINES: tuple[str, ...] = ()  # macros compiled in as -D<macro>: the package sets none; ``defined`` sets some


class Unavailable(Exception):
    """The native library cannot be built or loaded here; the message says why."""


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise Unavailable("no C++ compiler found (set CXX, or install g++ or clang++)")


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and feature flags (where Linux lists them; elsewhere
    the machine's name, so a cache shared between machines never hands one the other's build)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.processor()} {platform.machine()} {platform.node()}"


@contextlib.contextmanager
def defined(*macros: str) -> Iterator[None]:
    """While the block runs, ``library`` builds and loads the kernels with ``macros`` defined too (each ``NAME`` or
    ``NAME=value``, compiled in as ``-D<macro>``); each such variant is cached apart from the package's build.

    Why: to measure a variant of a kernel (a part compiled out or a timer compiled in, under an ``#ifdef`` in its
    source) without editing or copying that source. What was bound from a library inside the block (a
    ``NativeStack`` made there binds the kernel's functions when made) keeps that variant; however the block ends,
    ``DEFINES`` and ``library``'s cache are restored after it, so ``library`` gives the package's build again."""
    global DEFINES
    for macro in macros:
        if not re.fullmatch(r"[A-Za-z_]\w*(=.*)?", macro):
            raise ValueError(f"not a macro to define: {macro!r} (NAME or NAME=value)")
    before = DEFINES
    DEFINES = (*before, *macros)
    library.cache_clear()
    try:
        yield
    finally:
        DEFINES = before
        library.cache_clear()


@cache
def library(name: str) -> ctypes.CDLL:
    """The compiled ``<name>.cpp``, built once per source/compiler/flags/CPU and cached; raises ``Unavailable``."""
    try:
        compiler, source, target = build_paths(name)
        if target.exists():
            try:
                return ctypes.CDLL(str(target))
            except OSError:  # damaged (a full disk, a killed copy): build it again
                target.unlink(missing_ok=True)
        _build(compiler, source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        raise Unavailable(f"cannot build or load the native {name} kernel: {error}") from None


def build_paths(name: str) -> tuple[str, Path, Path]:
    """The compiler, the source and the cached library for ``name``."""
    source, compiler = SOURCES / f"{name}.cpp", _compiler()
    version = _run([compiler, "--version"]).stdout
    key = hashlib.sha256("\0".join([source.read_text(), version, *_flags(), _cpu()]).encode()).hexdigest()[:16]
    return compiler, source, cache_dir() / "native" / f"{name}-{key}.so"


def _flags() -> list[str]:
    """The compiler's flags: ``FLAGS``, then ``-D<macro>`` for each of ``DEFINES`` (none for the package's build, so
    its cache key, and the library cached under it, are those it had before ``DEFINES`` existed)."""
    return [*FLAGS, *(f"-D{macro}" for macro in DEFINES)]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _build(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # then renamed: never half a library
        built = Path(tmp) / target.name
        result = _run([compiler, *_flags(), str(source), "-o", str(built)])
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr)
            raise Unavailable(f"compiling {source.name} with {compiler} failed: {first.strip()[:300]}")
        os.replace(built, target)
