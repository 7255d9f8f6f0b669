"""Run folders and their files: never overwritten, always written atomically, always with provenance."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from bnrepro.errors import UserError


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; results are for sharing
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_writable(folder: Path) -> None:
    """Fail early, before any work, if results could not be saved under ``folder``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write results to {folder} ({err.strerror}); choose another --out") from None


def new_run_dir(parent: Path, prefix: str = "") -> Path:
    """A fresh folder ``parent/[prefix]YYYYmmdd-HHMMSS[-n]``; an existing run is never reused."""
    check_writable(parent)
    stamp = prefix + datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = Path(parent) / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"cannot create a new run folder in {parent}")


def git_commit() -> str:
    """The commit of the checkout this package runs from, with ``+dirty`` for uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not '{name}'")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    names = ["bnrepro", "torch", "torchvision", "numpy", "pydantic", "pandas"]
    found = {"python": sys.version.split()[0]}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


OWNER = "running.pid"


def check_free(run_dir: Path) -> None:
    """Refuse to resume a run that a live process is still training (two writers would corrupt it)."""
    lock = Path(run_dir) / OWNER
    try:
        pid, host = lock.read_text().split()
    except (OSError, ValueError):
        return
    if host != socket.gethostname():
        raise UserError(f"run {run_dir} is being trained on {host} (process {pid}); if that has ended, delete "
                        f"{lock} and resume again")
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return  # a crashed run's stale mark
    except PermissionError:
        pass
    raise UserError(f"run {run_dir} is still being trained by process {pid}; stop it before resuming")


@contextmanager
def owned(run_dir: Path, main: bool = True) -> Iterator[None]:
    """Mark ``run_dir`` as being trained by this process while the block runs (main replica only)."""
    lock = Path(run_dir) / OWNER
    if main:
        atomic_write(lock, f"{os.getpid()} {socket.gethostname()}\n")
    try:
        yield
    finally:
        if main:
            lock.unlink(missing_ok=True)
