"""Run folders and their files: never overwritten, always written atomically, always with provenance."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
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


TEMPORARY = ".tmp"  # atomic_write's temporary files: .<name>.<random>.tmp beside the file they become


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a torn one. A failed write (a
    full disk) leaves no temporary file, and its ``OSError`` names ``path``: ``write`` alone names no file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; results are for sharing
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporary(folder: Path) -> list[Path]:
    """Delete what ``atomic_write`` left in ``folder`` when its process was killed mid-write (kill -9, a power cut):
    a checkpoint's is as large as the checkpoint. Only for a folder no other process writes (a run this process owns).
    Returns the files removed."""
    found = [path for path in Path(folder).glob(f".*{TEMPORARY}") if path.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    return found


def atomic_torch_save(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` of ``state`` (any tensors, lists, numbers, strings) through ``atomic_write``: readers see
    the old file or the whole new one (checkpoints, and the user cache's tensors)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


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


class Damaged(UserError):
    """A file of a run folder that cannot be read as what it should be (torn by a crash, emptied, edited): readers
    of many runs skip that run with one line (``skip``), so one bad folder never stops a report or a campaign; a
    reader of one run reports it as the user error it is."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} {why}")
        self.path, self.why = Path(path), why


def read_json(path: Path, keys: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON object in ``path``, with every one of ``keys``; anything else raises ``Damaged``."""
    path = Path(path)
    try:
        text = path.read_text()
        value = json.loads(text)
    except FileNotFoundError:
        raise Damaged(path, "is missing") from None
    except UnicodeDecodeError:
        raise Damaged(path, "is not text") from None
    except OSError as err:
        raise Damaged(path, f"cannot be read ({err.strerror})") from None
    except ValueError as err:
        raise Damaged(path, "is empty" if not text.strip() else f"is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise Damaged(path, "holds no JSON object")
    missing = [key for key in keys if key not in value]
    if missing:
        raise Damaged(path, f"lacks {', '.join(missing)}")
    return value


def read_table(path: Path, columns: Iterable[str]):
    """The CSV table in ``path`` (a pandas DataFrame) with every one of ``columns``; anything else raises
    ``Damaged``."""
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise Damaged(path, "is missing") from None
    except pd.errors.EmptyDataError:
        raise Damaged(path, "is empty") from None
    except (OSError, ValueError) as err:  # ParserError and UnicodeDecodeError are ValueErrors
        raise Damaged(path, f"is not a readable CSV table ({str(err).strip().splitlines()[0]})") from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise Damaged(path, f"lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)}")
    return frame


_skipped: set[Path] = set()


def skip(damage: Damaged) -> None:
    """Say, once per file and process, that a run is left out because of ``damage`` (several readers of one
    command, e.g. the report's figures and its claims, meet the same run)."""
    if damage.path in _skipped:
        return
    _skipped.add(damage.path)
    print(f"warning: skipping {damage.path.parent}: {damage.path.name} {damage.why}", file=sys.stderr, flush=True)


# What a manifest's "status" says: a run is "running" until its trainer starts, "interrupted" while it trains (what
# it should say if the process dies), then "complete" or "diverged" (finished: nothing to resume); an evaluation
# that ends without its results is "failed" (or "interrupted" by Ctrl-C).
RUNNING, INTERRUPTED, FAILED, COMPLETE, DIVERGED = "running", "interrupted", "failed", "complete", "diverged"
FINISHED = (COMPLETE, DIVERGED)


def manifest_start(experiment: str, device: torch.device, fields: dict[str, Any], commit: str | None = None
                   ) -> dict[str, Any]:
    """A new run's manifest: what every run records (kind, status, start, device, versions, the code's commit: read
    now unless given) around the run's own ``fields``."""
    return {"experiment": experiment, "status": RUNNING, "started": now(), **fields, "device": device_name(device),
            "versions": versions(), "git_commit": commit or git_commit()}


def runs_of(results: Path, experiment: str, statuses: tuple[str, ...] = (COMPLETE,)) -> list[tuple[Path, dict]]:
    """(folder, manifest) of every run under ``results/experiment`` whose status is one of ``statuses``,
    oldest first (by start time, then folder name). A run whose manifest cannot be read is skipped (``skip``)."""
    found = []
    for manifest_path in (Path(results) / experiment).glob("*/manifest.json"):
        try:
            manifest = read_json(manifest_path)
        except Damaged as damage:
            skip(damage)
            continue
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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without the host waiting: to a GPU through pinned memory, asynchronously (a copy
    from ordinary memory would block until the GPU's queue reaches it)."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


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


class RunLock:
    """This process's claim on a run folder: an exclusive ``flock`` on ``RUN/running.pid``, which names the process.

    Taken before anything else happens to the folder, so of two processes started together on one run exactly one
    trains it; the kernel drops the lock when its process dies (kill -9 included), so a crash leaves no lock to
    clear by hand, only a stale name that the next claim overwrites. A name from another host is still obeyed
    (as before locks), since a lock over a network file system may not reach this host."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def claim(cls, run_dir: Path) -> RunLock:
        """Own ``run_dir`` or raise a ``UserError`` naming who does."""
        path = Path(run_dir) / OWNER
        for _ in range(100):  # each retry means another process released the folder in between: rare
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"cannot take {path} ({err.strerror}); is {run_dir} a run folder you may write?") \
                    from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                os.close(fd)
                who = f"process {holder[0]}" if holder else "another process"
                raise UserError(f"run {run_dir} is being trained by {who}; wait for it to end, or stop it, before "
                                f"resuming") from None
            if cls._still_there(path, fd):  # not unlinked by its last owner between our open and our flock
                return cls._named(path, fd)
            os.close(fd)
        raise UserError(f"cannot take {path}: other processes keep claiming and releasing {run_dir}")

    @staticmethod
    def _still_there(path: Path, fd: int) -> bool:
        try:
            return os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @classmethod
    def _named(cls, path: Path, fd: int) -> RunLock:
        """Write this process's name into the locked file, unless it names a process of another host."""
        mark = os.pread(fd, 200, 0).decode(errors="replace").split()
        here = socket.gethostname()
        if len(mark) == 2 and mark[1] != here:
            os.close(fd)
            raise UserError(f"run {path.parent} is being trained on {mark[1]} (process {mark[0]}); if that has ended, "
                            f"delete {path} and resume again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {here}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Give the folder up: the file goes first, so no later claim can lock a name that is about to vanish."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if self._still_there(self.path, self.fd):
                self.path.unlink()
        os.close(self.fd)
        self.fd = -1


@contextmanager
def training(run_dir: Path, manifest: dict[str, Any], main: bool = True, owner: RunLock | None = None
             ) -> Iterator[None]:
    """While the block trains: the manifest says "interrupted" (what the folder should say if the process dies)
    and the run is owned by this process (``owner``, or a ``RunLock`` claimed here and released at the end);
    afterwards, interrupted or not, the time spent is added to the manifest's ``wall_seconds``. Only the main
    replica writes or claims."""
    started = time.perf_counter()
    mine = RunLock.claim(run_dir) if main and owner is None else None
    manifest["status"] = INTERRUPTED
    try:
        if main:
            write_json(Path(run_dir) / "manifest.json", manifest)
        yield
    finally:
        manifest["wall_seconds"] = round(manifest.get("wall_seconds", 0) + time.perf_counter() - started, 2)
        try:
            if main:
                write_json(Path(run_dir) / "manifest.json", manifest)
        finally:
            if mine is not None:
                mine.release()


def announce(run: str, deviations: list[str]) -> None:
    """Print a run's deviations from the paper (at its start and end), so no log hides them."""
    lines = [f"{run}: {len(deviations)} deviation{'s' * (len(deviations) != 1)} from the paper"
             + (":" if deviations else "")] + [f"  - {text}" for text in deviations]
    print("\n".join(lines), file=sys.stderr, flush=True)
