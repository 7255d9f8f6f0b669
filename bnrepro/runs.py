"""Run folders and their files: never overwritten, always written atomically, always with provenance."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from bnrepro.errors import UserError


def cache_dir() -> Path:
    """The user cache: downloaded data sets and compiled native kernels."""
    return Path(os.environ.get("BNREPRO_CACHE", Path.home() / ".cache" / "bnrepro"))


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


def runs_of(results: Path, experiment: str, statuses: tuple[str, ...] = ("complete",)) -> list[tuple[Path, dict]]:
    """(folder, manifest) of every run under ``results/experiment`` whose status is one of ``statuses``,
    oldest first (by start time, then folder name)."""
    found = []
    for manifest_path in (Path(results) / experiment).glob("*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("status") in statuses and manifest.get("experiment", experiment) == experiment:
            found.append((manifest_path.parent, manifest))
    return sorted(found, key=lambda run: (str(run[1].get("started", "")), run[0].name))


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


def default_workers(most: int = 4) -> int:
    """Data-loading workers when --workers is not given: ``most``, or the CPUs this process may run on if fewer
    (more workers than that only make the DataLoader warn)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        usable = os.cpu_count() or 1
    return min(most, usable)


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
def training(run_dir: Path, manifest: dict[str, Any], main: bool = True) -> Iterator[None]:
    """While the block trains: the manifest says "interrupted" (what the folder should say if the process dies)
    and ``running.pid`` names this process; afterwards, interrupted or not, the time spent is added to the
    manifest's ``wall_seconds``. Only the main replica writes."""
    lock, started = Path(run_dir) / OWNER, time.perf_counter()
    manifest["status"] = "interrupted"
    if main:
        write_json(Path(run_dir) / "manifest.json", manifest)
        atomic_write(lock, f"{os.getpid()} {socket.gethostname()}\n")
    try:
        yield
    finally:
        manifest["wall_seconds"] = round(manifest.get("wall_seconds", 0) + time.perf_counter() - started, 2)
        if main:
            write_json(Path(run_dir) / "manifest.json", manifest)
            lock.unlink(missing_ok=True)


def announce(run: str, deviations: list[str]) -> None:
    """Print a run's deviations from the paper (at its start and end), so no log hides them."""
    lines = [f"{run}: {len(deviations)} deviation{'s' * (len(deviations) != 1)} from the paper"
             + (":" if deviations else "")] + [f"  - {text}" for text in deviations]
    print("\n".join(lines), file=sys.stderr, flush=True)
