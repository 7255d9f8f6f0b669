"""CIFAR-10 as torchvision distributes it (python batches), a data source like the others: resident, in stored order,
with its own data identity; bad files are one clear error; the download is torchvision's, never tried offline here."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from bnrepro.data import sources
from bnrepro.data.sources import cifar
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.errors import UserError
from bnrepro.experiments import imagenet

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root, per_batch: int = 12, seed: int = 0):
    """CIFAR-10's layout with ``per_batch`` random images in each of the six batches; returns ``root``."""
    folder = root / cifar.FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch}, f)
    for name in [*cifar.TRAIN, *cifar.VAL]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_the_batches_open_resident_in_their_stored_order(tmp_path):
    root = write_cifar(tmp_path)
    train, val = sources.open_split(root, "train", shard_size=8), sources.open_split(root, "val")
    assert (len(train), len(val)) == (60, 12) and train.classes == val.classes == CLASSES
    with open(root / cifar.FOLDER / "data_batch_2", "rb") as f:
        second = pickle.load(f)
    row = second["data"][3]  # example 15 of the split: the second batch's fourth row, as stored
    assert torch.equal(train.pixels[15], torch.from_numpy(row).view(3, 32, 32))
    assert train.labels[15] == second["labels"][3] and train.pixels.dtype == torch.uint8
    assert train.shard_starts.tolist() == [0, 8, 16, 24, 32, 40, 48, 56, 60]
    assert torch.equal(train.image(15), train.pixels[15])  # RGB already
    assert sources.open_split(root / cifar.FOLDER, "val").labels.tolist() == val.labels.tolist()  # either folder


def test_cifar_has_its_own_data_identity(tmp_path):
    root = write_cifar(tmp_path / "a")
    identity = sources.data_identity(root)
    assert identity["format"] == "cifar" and identity["name"] == "CIFAR-10 python batches"
    assert (identity["train_examples"], identity["val_examples"]) == (60, 12)
    assert sources.data_identity(write_cifar(tmp_path / "b"))["digest"] == identity["digest"]  # same bytes
    assert sources.data_identity(write_cifar(tmp_path / "c", seed=1))["digest"] != identity["digest"]


@pytest.mark.parametrize("damage", ["missing", "garbage", "short rows"])
def test_a_bad_batch_is_one_clear_error(tmp_path, damage):
    root = write_cifar(tmp_path)
    path = root / cifar.FOLDER / "data_batch_3"
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"not a pickle")
    else:
        with open(path, "wb") as f:
            pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(UserError, match="data_batch_3"):
        sources.open_split(root, "train")


def test_fetch_finds_the_batches_without_downloading(tmp_path, monkeypatch):
    import torchvision.datasets

    root = write_cifar(tmp_path)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("tried to download CIFAR-10"))
    assert cifar.fetch(root) == root / cifar.FOLDER
    monkeypatch.undo()
    assert not cifar.official(root / cifar.FOLDER)  # these are not torchvision's files


def test_a_smoke_run_trains_on_cifar_batches(tmp_path):
    root = write_cifar(tmp_path / "data")
    options = imagenet.Options(root, device="cpu", workers=0, show_progress=False)
    run = imagenet.run("bn-x5", "smoke", ["profiles.smoke.steps=2"], options, tmp_path / "out", SINGLE_PROCESS)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["resident"] and manifest["data_identity"]["format"] == "cifar"
    assert manifest["status"] == "complete"


@pytest.mark.skipif(not (SHARED_DATA / "cifar10").is_dir(), reason="no shared data folder")
def test_the_shared_jpeg_copy_opens_as_class_folders():
    train = sources.open_split(SHARED_DATA / "cifar10", "train")
    val = sources.open_split(SHARED_DATA / "cifar10", "val", train.classes)
    assert (len(train), len(val)) == (50_000, 10_000) and train.classes == CLASSES
    first = train.labels[:1000]
    assert len(set(first.tolist())) == 10  # path-hash order: classes mix from the start
