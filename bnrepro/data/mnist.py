"""MNIST through torchvision, from the original ``.gz`` files wherever they already are.

Looked for, in order: ``DIR/mnist/raw/`` and ``DIR/MNIST/raw/`` for ``DIR`` = ``--data-dir``, else
``$BNREPRO_DATA`` (the user's explicit choices: a folder without the files is an error, never silently replaced),
else the user cache (``$BNREPRO_CACHE`` or ``~/.cache/bnrepro``), else the copy embedded in the package
(``bnrepro/data/mnist_raw/``, the four original files, CC BY-SA 3.0: see its NOTICE.md), so that the main
command runs offline on a fresh machine. The four ``.gz`` files are read as they are (checked against
torchvision's MD5s, recorded in the manifest); files torchvision extracted earlier work too. Only when the
embedded copy was deleted too is MNIST downloaded, by torchvision, into the user cache.

torchvision parses a folder once; the tensors are then kept in the user cache while the files are
unchanged, so later runs need not import torchvision at all: that import alone takes ~3 s (it pulls in
``torch._dynamo``), a tenth of a 1-seed experiment.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from bnrepro.data.cache import cached
from bnrepro.data.idx import check_headers
from bnrepro.data.order import epoch_generator
from bnrepro.errors import UserError
from bnrepro.runs import cache_dir

FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",  # as torchvision's MNIST.resources names them
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
EMBEDDED = Path(__file__).resolve().parent / "mnist_raw"  # the four original files, shipped with the package
EMBEDDED_COPY = "embedded (bnrepro/data/mnist_raw, MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0)"
HOW_TO_GET = ("put the four original MNIST .gz files in DIR/mnist/raw/ and pass --data-dir DIR "
              "(or set BNREPRO_DATA=DIR)")


@dataclass(frozen=True)
class MnistArrays:
    """MNIST as tensors: uint8 images (N, 28, 28) and int64 labels (N,), plus where they came from."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    source: str  # the folder read, or "embedded": the package's own copy
    official: bool  # all four files match the MD5s torchvision publishes
    arrays_sha256: str  # arrays_digest(): the data's identity, the same for .gz or extracted files
    copy: str = ""  # which choice found it: "--data-dir", "BNREPRO_DATA", "user cache", EMBEDDED_COPY, ...


def data_root(data_dir: Path | None) -> tuple[Path, bool]:
    """The folder to search, and whether it is the user cache (after which the embedded copy is the fallback)."""
    if data_dir is not None:
        return Path(data_dir), False
    if os.environ.get("BNREPRO_DATA"):
        return Path(os.environ["BNREPRO_DATA"]), False
    return cache_dir(), True


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds all four files, each packed or as torchvision extracted it."""
    return all((folder / f).is_file() or (folder / f.removesuffix(".gz")).is_file() for f in FILES)


def _raw_folder(root: Path) -> Path | None:
    return next((root / name / "raw" for name in ("mnist", "MNIST") if _complete(root / name / "raw")), None)


def load(data_dir: Path | None = None, download: bool = True) -> MnistArrays:
    """Find MNIST (in the order the module docstring gives) and return it as tensors; any problem is a UserError."""
    root, is_cache = data_root(data_dir)
    folder = _raw_folder(root)
    if folder is not None:
        copy = "user cache" if is_cache else "--data-dir" if data_dir is not None else "BNREPRO_DATA"
        return replace(read_folder(folder), copy=copy)
    looked = ", ".join(str(root / name / "raw") for name in ("mnist", "MNIST"))
    if not is_cache:  # the user's explicit choice: say it is wrong rather than train on other files
        raise UserError(f"MNIST not found (looked in {looked}); {HOW_TO_GET}")
    if _complete(EMBEDDED):
        return embedded()
    if not download:
        raise UserError(f"MNIST not found (looked in {looked} and the package's copy {EMBEDDED}); {HOW_TO_GET}")
    _download(root)
    folder = _raw_folder(root)
    if folder is None:
        raise UserError(f"MNIST not found after downloading it into {root}; {HOW_TO_GET}")
    return replace(read_folder(folder), copy="downloaded into the user cache")


def embedded() -> MnistArrays:
    """The copy shipped in the package (bnrepro/data/mnist_raw, see its NOTICE.md)."""
    return replace(read_folder(EMBEDDED), source="embedded", copy=EMBEDDED_COPY)


def _download(root: Path) -> None:
    """torchvision's download of MNIST into ``root``, the user cache: only where the embedded copy was deleted
    (a trimmed install), which is why this path is kept at all."""
    from torchvision.datasets import MNIST

    try:
        MNIST(root=str(root), train=True, download=True)
    except Exception as err:  # no network, mirror down, disk full: all mean the same to the user
        raise UserError(f"MNIST is not in {root} nor in the package ({EMBEDDED} is incomplete) and downloading it "
                        f"failed ({err.__class__.__name__}); {HOW_TO_GET}") from None


def load_for_resume(source: str | None, data_dir: Path | None) -> MnistArrays:
    """The data to resume a run with that recorded ``source``: ``data_dir`` if given; else the run's own copy (its
    folder, or the embedded copy) while it is still there; else wherever ``load`` finds MNIST now. The caller
    compares the result's ``arrays_sha256`` with the run's, so none of these can swap the data silently."""
    if data_dir is not None:
        return load(data_dir)
    if source == "embedded" and _complete(EMBEDDED):
        return embedded()
    if source and source != "embedded" and _complete(Path(source)):
        return replace(read_folder(Path(source)), copy="the run's own folder")
    return load(None)


def read_folder(folder: Path, cache: bool = True) -> MnistArrays:
    """The idx files of ``folder``, parsed by torchvision. With ``cache`` the tensors are kept in the user cache,
    one entry per folder, and reused while the files' bytes are unchanged (their SHA-256, ~20 ms to compute),
    so later runs need not import torchvision."""
    if not cache:
        return _parse(folder)
    try:
        digest = _digest(folder)
    except OSError:  # a file is missing or unreadable: parsing says which
        return _parse(folder)
    entry = cache_dir() / "mnist-parsed" / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}.pt"
    names = {field.name for field in fields(MnistArrays)}
    saved = cached(entry, digest, lambda: asdict(_parse(folder)), accept=lambda saved: set(saved) == names)
    return replace(MnistArrays(**saved), source=str(folder))


def _digest(folder: Path) -> str:
    """SHA-256 of the four files as found (packed or extracted): their names and bytes."""
    digest = hashlib.sha256()
    for name in FILES:
        path = folder / name if (folder / name).is_file() else folder / name.removesuffix(".gz")
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _parse(folder: Path) -> MnistArrays:
    """Parse the idx files with torchvision, from a scratch copy laid out the way its MNIST class expects."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import check_integrity

    check_headers(folder / name for name in FILES)  # a header torchvision does not expect: one line naming the file
    official = all(check_integrity(str(folder / name), md5) for name, md5 in MNIST.resources)
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in FILES:
            _extract(folder, name, raw / name.removesuffix(".gz"))
        try:
            train, test = (MNIST(root=scratch, train=flag) for flag in (True, False))
        except (AssertionError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"the MNIST files in {folder} are not valid idx files ({err or 'bad header'}); "
                            "replace them with the originals") from None
    for split, data in (("train", train), ("test", test)):
        if len(data.data) != len(data.targets) or data.data.shape[1:] != (28, 28):
            raise UserError(f"the MNIST {split} files in {folder} disagree: {len(data.data)} images of "
                            f"{tuple(data.data.shape[1:])} but {len(data.targets)} labels; replace them")
        if len(data.targets) and not 0 <= int(data.targets.min()) <= int(data.targets.max()) <= 9:
            raise UserError(f"the MNIST {split} labels in {folder} are not all digits 0-9; replace the file")
    arrays = (train.data, train.targets, test.data, test.targets)
    return MnistArrays(*arrays, str(folder), official, arrays_digest(*arrays))


def arrays_digest(*arrays: Tensor) -> str:
    """SHA-256 of the arrays' shapes, types and values (~0.1 s for MNIST, once per parse): what a resumed run must
    train on again, whether its files come packed, extracted or from another folder."""
    digest = hashlib.sha256(b"bnrepro mnist arrays 1\0")
    for array in arrays:
        digest.update(f"{tuple(array.shape)} {array.dtype}\0".encode())
        digest.update(array.contiguous().numpy())
    return digest.hexdigest()


def _extract(folder: Path, name: str, target: Path) -> None:
    packed, unpacked = folder / name, folder / name.removesuffix(".gz")
    try:
        if packed.is_file():
            with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(unpacked, target)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise UserError(f"cannot read {packed if packed.is_file() else unpacked}: it is corrupt or "
                        f"truncated ({err.__class__.__name__}); replace it with the original") from None


def binarize(images: Tensor, threshold: float) -> Tensor:
    """The paper's binary input: (N, 28, 28) uint8 -> (N, 784) bool, pixel/255 > threshold."""
    return images.reshape(len(images), -1) > threshold * 255


class EpochBatches:
    """Mini-batches as a pure function of the step: each epoch is a fresh permutation from (seed, epoch).

    Resuming at step k therefore sees exactly the batches an uninterrupted run would; the last partial
    batch of an epoch is dropped so every step has ``batch_size`` examples.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        if batch_size > size:
            raise UserError(f"batch size {batch_size} is larger than the {size} training examples")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = size // batch_size
        self._epoch, self._order = -1, None

    def indices(self, step: int) -> Tensor:
        epoch, within = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            generator = epoch_generator(self.seed, epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator)
        return self._order[within * self.batch_size : (within + 1) * self.batch_size]
