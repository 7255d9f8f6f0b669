"""ImageNet data and training on CPU: folders and shards, shuffling orders, the smoke profile of every recipe
through the CLI, exact resume, DDP with two gloo processes, corrupt images, divergence, bad input."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA
from test_cli import cli_env, run_many, squeeze
from torchvision.io import encode_jpeg, encode_png

from bnrepro import recipes as recipe_io
from bnrepro.data import order as ordering
from bnrepro.data import pipeline, sources, transforms
from bnrepro.data.pack import pack
from bnrepro.data.resident import synthetic as synthetic_splits
from bnrepro.data.split import Split, decode
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.engine.trainer import Interrupted
from bnrepro.errors import UserError
from bnrepro.experiments import imagenet as experiment

WNIDS = ["n01440764", "n01443537", "n01484850"]  # ImageNet classes 0, 1, 2
SAMPLE = SHARED_DATA / "imagenet-sample"


def write_images(root: Path, classes: list[str], per_class: dict[str, int], corrupt: bool = False) -> Path:
    """Class folders of small JPEGs whose colour says the class (plus a grayscale PNG and a portrait image);
    ``corrupt`` adds one unreadable .jpg to each split."""
    generator = torch.Generator().manual_seed(0)
    for split, count in per_class.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (40, 30) if i % 3 == 0 else (30, 44)  # portrait and landscape
                base = torch.zeros(3, h, w)
                base[c % 3] = 200
                pixels = (base + 40 * torch.rand(3, h, w, generator=generator)).to(torch.uint8)
                if i == 1:
                    (folder / f"{i}.png").write_bytes(encode_png(pixels[:1]).numpy().tobytes())  # grayscale
                else:
                    (folder / f"{i}.JPEG").write_bytes(encode_jpeg(pixels).numpy().tobytes())
        if corrupt:
            (root / split / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("folders"), ["cat", "dog", "owl"], {"train": 12, "val": 4})


@pytest.fixture(scope="module")
def shards(folders, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("shards")
    pack(folders, dest, shard_size=5, seed=0)
    return dest


# --- data ------------------------------------------------------------------------------------------------

def test_wnid_folders_keep_their_imagenet_labels(tmp_path):
    write_images(tmp_path, [WNIDS[0], WNIDS[2]], {"train": 2})
    split = sources.open_split(tmp_path, "train")
    assert len(split.classes) == 1000
    assert sorted(set(split.labels.tolist())) == [0, 2]


def test_other_folders_are_numbered_in_sorted_order(folders):
    split = sources.open_split(folders, "train")
    assert split.classes == ["cat", "dog", "owl"]
    assert [split.classes[label] for label in split.labels] == [Path(f).parent.name for f in split.files]
    assert np.bincount(split.labels).tolist() == [12, 12, 12]
    assert not split.packed


def path_hash_order(split_dir: Path) -> list[str]:
    """The stored order class folders must have: by SHA-256 of ``<class>/<file name>``, whatever the seed."""
    relative = [f"{f.parent.name}/{f.name}" for f in split_dir.glob("*/*")]
    return sorted(relative, key=lambda r: hashlib.sha256(r.encode()).hexdigest())


def test_folders_are_stored_in_path_hash_order_and_cut_into_virtual_shards(folders):
    torch.manual_seed(1)
    np.random.seed(1)
    split = sources.open_split(folders, "train", shard_size=5)
    assert [f"{Path(f).parent.name}/{Path(f).name}" for f in split.files] == path_hash_order(folders / "train")
    assert split.shard_starts.tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 36]  # 36 examples, the last shard short
    torch.manual_seed(2)
    np.random.seed(2)
    again = sources.open_split(folders, "train", shard_size=5)
    assert again.files == split.files and again.labels.tolist() == split.labels.tolist()  # no seed in it
    assert sources.open_split(folders, "train").shard_starts.tolist() == [0, 36]  # default 1000 per shard
    assert sources.open_split(folders, "train", shard_size=36).shard_starts.tolist() == [0, 36]
    with pytest.raises(UserError, match="shard_size"):
        sources.open_split(folders, "train", shard_size=0)


def batch_mates(split: Split, order: str, batch_size: int, epoch: int) -> set[frozenset[int]]:
    """Which examples share a mini-batch in one epoch (batches aligned with the epoch)."""
    stream = ordering.TrainingStream(split, order, 3, batch_size, rank=0, world=1, buffer_shards=2,
                                   start_step=epoch * len(split) // batch_size)
    steps = len(split) // batch_size
    return {frozenset(i for _, i in batch) for _, batch in zip(range(steps), stream)}


def test_folder_shuffling_means_what_the_recipe_says(tmp_path):
    """Change 6 must not vanish on class folders: with ``shards`` the same examples keep meeting in the same
    mini-batches epoch after epoch; ``within_shard`` mixes them."""
    generator = torch.Generator().manual_seed(0)
    for c in range(4):
        (tmp_path / "train" / f"class{c}").mkdir(parents=True)
        for i in range(10):
            pixels = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=generator)
            (tmp_path / "train" / f"class{c}" / f"{i}.png").write_bytes(encode_png(pixels).numpy().tobytes())
    split = sources.open_split(tmp_path, "train", shard_size=5)
    assert len(split) == 40 and len(split.shard_starts) - 1 == 8 and not split.packed
    shards = {frozenset(range(s, s + 5)) for s in range(0, 40, 5)}
    assert batch_mates(split, "shards", 5, 0) == batch_mates(split, "shards", 5, 1) == shards
    first, second = (ordering.epoch_order(split, "shards", 3, epoch, 2).tolist() for epoch in (0, 1))
    assert first != second  # the shard order changes, the company inside a batch does not
    assert batch_mates(split, "within_shard", 5, 0) != batch_mates(split, "within_shard", 5, 1)
    assert batch_mates(split, "within_shard", 5, 0) != shards
    wide = sources.open_split(tmp_path, "train", shard_size=10)  # a batch of half a shard, aligned
    assert batch_mates(wide, "shards", 5, 0) == batch_mates(wide, "shards", 5, 1) == shards
    assert batch_mates(wide, "within_shard", 5, 0) != batch_mates(wide, "within_shard", 5, 1)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/data/imagenet-sample is absent")
def test_the_real_imagenet_sample_loads_with_standard_labels():
    split = sources.open_split(SAMPLE, "val")
    assert len(split) == 250 and sorted(split.labels.tolist()) == list(range(0, 1000, 4))
    transform = transforms.evaluation_transform(224, 256 / 224)
    for i in range(0, 250, 50):
        image = transforms.prepare(torch.frombuffer(bytearray(split.read(i)), dtype=torch.uint8), transform, 0)
        assert image.shape == (3, 224, 224) and image.dtype == torch.uint8


def test_packing_keeps_every_example_and_is_reproducible(folders, shards, tmp_path):
    folder, packed = sources.open_split(folders, "train"), sources.open_split(shards, "train")
    assert packed.packed and len(packed.shard_starts) - 1 == 8  # 36 examples in shards of 5
    assert sources.open_split(shards, "train", shard_size=2).shard_starts.tolist() == packed.shard_starts.tolist()
    assert packed.classes == folder.classes
    content = sorted((folder.read(i), int(folder.labels[i])) for i in range(len(folder)))
    assert sorted((packed.read(i), int(packed.labels[i])) for i in range(len(packed))) == content
    with tarfile.open(shards / "train-000000.tar") as tar:  # key i is the i-th file by class, then name
        member = next(m for m in tar if m.name.endswith((".jpg", ".png")))
        number = int(member.name.partition(".")[0].removeprefix("train"))
        by_name = sorted(folder.files, key=lambda f: (Path(f).parent.name, Path(f).name))
        assert tar.extractfile(member).read() == Path(by_name[number]).read_bytes()
    pack(folders, tmp_path, shard_size=5, seed=0)
    assert (tmp_path / "train-000003.tar").read_bytes() == (shards / "train-000003.tar").read_bytes()


def test_idx_files_pack_as_png_shards(tmp_path):
    from conftest import write_mnist

    raw = write_mnist(tmp_path / "data") / "mnist" / "raw"
    counts = pack(raw, tmp_path / "out", shard_size=500)
    split = sources.open_split(tmp_path / "out", "val")
    assert len(split) == counts["val"] and split.classes == [str(d) for d in range(10)]
    image = decode(torch.frombuffer(bytearray(split.read(0)), dtype=torch.uint8))
    assert image.shape == (3, 28, 28)  # grayscale comes back as RGB


def test_shard_orders_mean_what_the_paper_meant(shards):
    split = sources.open_split(shards, "train")
    starts = split.shard_starts
    shard_of = np.searchsorted(starts, np.arange(len(split)), side="right") - 1

    by_shards = ordering.epoch_order(split, "shards", seed=1, epoch=0, buffer_shards=2)
    runs = [shard_of[by_shards[i]] for i in range(len(by_shards))]
    assert sorted(by_shards.tolist()) == list(range(len(split)))
    for s in range(len(starts) - 1):  # each shard read whole, in stored order
        members = by_shards[[i for i, r in enumerate(runs) if r == s]]
        assert members.tolist() == list(range(starts[s], starts[s + 1]))
    assert by_shards.tolist() != list(range(len(split)))  # but the shard order is shuffled

    within = ordering.epoch_order(split, "within_shard", seed=1, epoch=0, buffer_shards=2)
    assert sorted(within.tolist()) == list(range(len(split)))
    shard_order = list(dict.fromkeys(shard_of[by_shards].tolist()))  # both modes draw the same shard order
    first = 0
    for group in (shard_order[i:i + 2] for i in range(0, len(shard_order), 2)):  # buffers of 2 shards
        size = sum(starts[s + 1] - starts[s] for s in group)
        assert set(shard_of[within[first:first + size]].tolist()) == set(group)  # mixing stays in the buffer
        first += size
    assert within.tolist() != by_shards.tolist()

    again = ordering.epoch_order(split, "within_shard", seed=1, epoch=0, buffer_shards=2)
    assert again.tolist() == within.tolist()  # a pure function of (seed, epoch)
    assert ordering.epoch_order(split, "within_shard", seed=1, epoch=1, buffer_shards=2).tolist() != within.tolist()


def test_replicas_take_disjoint_slices_of_the_same_global_batch(folders):
    split = sources.open_split(folders, "train")
    one = ordering.TrainingStream(split, "within_shard", 0, 8, rank=0, world=1, start_step=0, buffer_shards=1)
    two = [ordering.TrainingStream(split, "within_shard", 0, 4, rank=r, world=2, start_step=0, buffer_shards=1)
           for r in range(2)]
    for _, whole, first, second in zip(range(10), one, *two):  # crosses epoch boundaries (36 examples)
        assert whole == first + second
    resumed = ordering.TrainingStream(split, "within_shard", 0, 8, rank=0, world=1, start_step=7, buffer_shards=1)
    assert next(iter(resumed)) == [batch for _, batch in zip(range(8), one)][-1]


def test_evaluation_counts_every_image_once_across_replicas():
    seen = [i for r in range(3) for batch in ordering.EvaluationBatches(10, 3, r, 3) for i, _ in batch]
    assert sorted(seen) == list(range(10))


def test_corrupt_and_empty_images_are_skipped_not_fatal(tmp_path):
    root = write_images(tmp_path, ["a", "b"], {"train": 2}, corrupt=True)
    (root / "train" / "b" / "empty.png").write_bytes(b"")
    split = sources.open_split(root, "train")
    examples = pipeline.Examples(split, transforms.evaluation_transform(16, 1.2), 0, jpegs_as_bytes=False)
    batch = pipeline.collate([examples[(i, i)] for i in range(len(split))])
    assert len(batch.skipped) == 2 and batch.images.shape == (4, 3, 16, 16)


def test_animated_images_give_their_first_frame(tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (20, 16), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    image = decode(torch.frombuffer(bytearray((tmp_path / "a.gif").read_bytes()), dtype=torch.uint8))
    assert image.shape == (3, 16, 20) and image.dtype == torch.uint8 and image[0].float().mean() > 200


def test_packing_again_replaces_the_old_shards_and_class_names_may_have_spaces(tmp_path):
    root = write_images(tmp_path / "src", ["golden retriever", "tabby cat"], {"train": 3, "val": 1})
    pack(root, tmp_path / "out", shard_size=1)
    pack(root, tmp_path / "out", shard_size=4)
    split = sources.open_split(tmp_path / "out", "train")
    assert len(split) == 6 and len(split.shard_starts) - 1 == 2
    assert split.classes == ["golden retriever", "tabby cat"]


def test_augmentation_is_a_function_of_the_example_position(folders):
    split = sources.open_split(folders, "train")
    transform = transforms.training_transform(24, 0.08, (0.75, 1.333), True, dict(brightness=0.4, contrast=0.4,
                                                                               saturation=0.4, hue=0.1))
    examples = pipeline.Examples(split, transform, 3, jpegs_as_bytes=False)
    torch.manual_seed(0)
    a = examples[(17, 5)][0]
    torch.rand(100)  # the global generator moves on; the example must not care
    assert torch.equal(a, examples[(17, 5)][0])
    assert not torch.equal(a, examples[(18, 5)][0])


def test_main_process_decoding_gives_the_workers_images(tmp_path):
    """The GPU path (JPEGs left encoded, decoded in one call, then augmented) matches the workers' path; run
    here on the CPU, and on the GPU by the gpu-marked test below. A corrupt JPEG costs only itself."""
    root = write_images(tmp_path, ["a"], {"train": 3}, corrupt=True)
    split = sources.open_split(root, "train")
    transform = transforms.training_transform(24, 0.08, (0.75, 1.333), True, dict(brightness=0.4, contrast=0.4,
                                                                               saturation=0.4, hue=0.1))
    by_worker = pipeline.Examples(split, transform, 5, jpegs_as_bytes=False)
    as_bytes = pipeline.Examples(split, transform, 5, jpegs_as_bytes=True)
    items = [as_bytes[(p, i)] for p, i in enumerate(range(len(split)))]
    assert sum(image.ndim == 1 for image, _, _ in items) == 3  # 2 good JPEGs, the broken one; the PNG is decoded
    batch = pipeline.on_device(pipeline.collate(items), transform, 5, torch.device("cpu"))
    expected = [by_worker[(p, p)][0] for p in range(len(split))]
    assert batch.skipped == [p for p, image in enumerate(expected) if image is None] and len(batch.skipped) == 1
    for position, image in zip(batch.positions, batch.images):
        assert torch.equal(image, expected[position])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_smoke_run_on_the_gpu_decodes_there_and_trains(folders, tmp_path):
    options = experiment.Options(folders, device="cuda", workers=2, show_progress=False)
    run = experiment.run("bn-x5", "smoke", ["profiles.smoke.steps=4"], options, tmp_path, SINGLE_PROCESS)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["gpu_decode"] and manifest["precision"] == "bf16 autocast" and manifest["status"] == "complete"


def test_missing_or_empty_data_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no 'train' data"):
        sources.open_split(tmp_path, "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        sources.open_split(tmp_path, "train")


# --- training --------------------------------------------------------------------------------------------

def test_learning_rate_decays_six_times_faster_in_bn_x5():
    from bnrepro import recipes

    base, fast = recipes.load("inception"), recipes.load("bn-x5")
    per_epoch = 1000  # examples; batch of 10 -> 100 steps per epoch
    profile = base.profiles["smoke"].model_copy(update={"batch_size": 10})
    slow_lr, fast_lr = (experiment.learning_rate(recipe, profile, per_epoch) for recipe in (base, fast))
    scale = 10 / 32  # linear scaling: batch 10 against the paper's 32
    assert slow_lr(799) == pytest.approx(scale * base.train.lr)  # every 8 epochs
    assert slow_lr(800) == pytest.approx(scale * base.train.lr * 0.96)
    assert fast_lr(133) == pytest.approx(scale * fast.train.lr)  # every 8/6
    assert fast_lr(134) == pytest.approx(scale * fast.train.lr * 0.96)


def test_a_compressed_profile_decays_on_paper_equivalent_steps():
    """profile.compression: step s stands for s / compression paper steps, whose epochs set the decay."""
    recipe = recipe_io.load("bn-x5")
    paper = recipe.profiles["paper"]
    profile = paper.model_copy(update={"batch_size": 128, "compression": 1e-3})
    lr = experiment.learning_rate(recipe, profile, 60_000)
    period = 8 / 6 * paper.train_examples / paper.batch_size * 1e-3  # the paper's decay period, in these steps
    assert lr(0) == pytest.approx(recipe.train.lr * 4)  # batch 128 = 4 x the paper's 32
    assert lr(int(period) - 1) == lr(0) and lr(int(period) + 1) == pytest.approx(lr(0) * 0.96)


def _run(recipe: str, data: Path, out: Path, steps: int, *overrides: str, workers: int = 0) -> Path:
    options = experiment.Options(data, device="cpu", workers=workers, show_progress=False)
    sets = [f"profiles.smoke.steps={steps}", *overrides]
    return experiment.run(recipe, "smoke", sets, options, out, SINGLE_PROCESS)


def _interrupted(monkeypatch, recipe: str, data: Path, out: Path, steps: int, at: int, workers: int = 0) -> Path:
    """A run stopped by a Ctrl-C during step ``at`` (it saves after that step); returns its folder."""
    losses = experiment.ImagenetTask.losses

    def interrupt(self, step):
        if step == at - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return losses(self, step)

    monkeypatch.setattr(experiment.ImagenetTask, "losses", interrupt)
    with pytest.raises(Interrupted) as stopped:
        _run(recipe, data, out, steps, workers=workers)
    monkeypatch.setattr(experiment.ImagenetTask, "losses", losses)
    assert stopped.value.step == at
    return stopped.value.path.parent


def test_k_steps_then_resume_then_the_rest_equals_n_steps(shards, tmp_path, monkeypatch):
    n, k = 6, 3
    straight = _run("bn-baseline", shards, tmp_path / "a", n)  # BN, dropout and LRN-free BN: RNG matters
    cut = _interrupted(monkeypatch, "bn-baseline", shards, tmp_path / "b", n, at=k, workers=2)
    resumed = experiment.resume(cut, SINGLE_PROCESS, device="cpu", workers=0, show_progress=False)

    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (straight, resumed))
    assert a["step"] == b["step"] == n
    assert set(a) == set(b) == {"step", "model"}  # finished: only what evaluation reads is kept
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    pd.testing.assert_frame_equal(pd.read_csv(straight / "metrics.csv"), pd.read_csv(resumed / "metrics.csv"))
    assert json.loads((resumed / "manifest.json").read_text())["status"] == "complete"


def test_resident_data_trains_in_batches_and_resumes_exactly(fake_mnist, tmp_path, monkeypatch):
    """MNIST-format idx files are held in memory and augmented a mini-batch at a time (no workers): k steps,
    Ctrl-C, resume, then the rest gives bit-identical weights and metrics to n steps in one go."""
    data, n, k = fake_mnist / "mnist" / "raw", 6, 3
    straight = _run("bn-x5", data, tmp_path / "a", n)
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["resident"] and manifest["workers"] == 0 and "idx files" in manifest["dataset"]
    cut = _interrupted(monkeypatch, "bn-x5", data, tmp_path / "b", n, at=k)
    resumed = experiment.resume(cut, SINGLE_PROCESS, device="cpu", workers=0, show_progress=False)
    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (straight, resumed))
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    pd.testing.assert_frame_equal(pd.read_csv(straight / "metrics.csv"), pd.read_csv(resumed / "metrics.csv"))


def test_resident_batches_are_the_file_backed_examples(fake_mnist, tmp_path):
    """The same training stream on packed shards, held in memory or read from the files: the same examples (the
    same images and labels) in the same mini-batches; only the augmentation's random numbers are drawn apart."""
    shards = tmp_path / "shards"
    pack(fake_mnist / "mnist" / "raw", shards, shard_size=50)
    tasks = []
    for resident in (True, False):
        options = experiment.Options(shards, device="cpu", workers=0, show_progress=False, resident=resident)
        task, _, _ = experiment.build(recipe_io.load("bn-x5"), "smoke", options, SINGLE_PROCESS)
        tasks.append(task)
    assert tasks[0].train_split.pixels is not None and tasks[1].train_split.pixels is None
    for batch_a, batch_b in zip(tasks[0].stream(0), itertools.islice(tasks[1].stream(0), 3)):
        assert batch_a == batch_b
        for _, index in batch_a:
            assert torch.equal(tasks[0].train_split.image(index), decode(torch.frombuffer(
                bytearray(tasks[1].train_split.read(index)), dtype=torch.uint8)))


def test_resume_refuses_other_replica_counts_and_other_data(shards, folders, tmp_path, monkeypatch):
    run = _interrupted(monkeypatch, "bn-x5", shards, tmp_path, 4, at=2)
    with pytest.raises(UserError, match="not the data"):
        experiment.resume(run, SINGLE_PROCESS, folders, device="cpu", workers=0, show_progress=False)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "replicas": 2}))
    with pytest.raises(UserError, match="2 process"):
        experiment.resume(run, SINGLE_PROCESS, device="cpu", workers=0, show_progress=False)


def test_a_diverging_run_ends_cleanly_and_records_the_step(folders, tmp_path):
    run = _run("inception-x5", folders, tmp_path, 6, "train.lr=1.0e+30")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged_at"] is not None and summary["diverged_at"] <= 2
    assert json.loads((run / "manifest.json").read_text())["status"] == "diverged"
    assert pd.read_csv(run / "metrics.csv")["top1"].isna().iloc[-1]


def test_corrupt_images_are_counted_in_the_summary(tmp_path):
    root = write_images(tmp_path / "data", ["a", "b"], {"train": 4, "val": 2}, corrupt=True)
    run = _run("bn-x5", root, tmp_path / "out", 4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_images"] >= 1 and summary["final_top1"] is not None


# --- through the command line ------------------------------------------------------------------------------

RECIPES = ["inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid", "inception-sigmoid", "inception-x5",
           "bn-x30-member6"]  # the last: per-activation BN, larger initial weights (Sec. 4.2.3)


@pytest.fixture(scope="module")
def smoke(folders, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out, env = root / "out", cli_env(root / "cache")
    common = ["--profile", "smoke", "--device", "cpu", "--workers", "0", "--no-progress", "--out", str(out)]
    commands = {name: ["imagenet", "--recipe", name, "--dataset-dir", str(shards), *common] for name in RECIPES}
    commands.update({
        "report": ["report", "--results", str(out)],
        "no-data": ["imagenet", "--recipe", "bn-x5", "--dataset-dir", str(root / "nowhere"), *common],
        "bad-profile": ["imagenet", "--recipe", "bn-x5", "--dataset-dir", str(shards), "--profile", "huge"],
        "mnist-recipe": ["imagenet", "--recipe", "mnist/bn", "--dataset-dir", str(shards), *common],
        "bad-key": ["imagenet", "--recipe", "bn-x5", "--dataset-dir", str(shards), "--set", "train.lrr=1", *common],
        "no-recipe": ["imagenet", "--dataset-dir", str(shards)],
        "pack-nothing": ["pack", str(root / "nowhere"), str(root / "packed")],
        "resume-with-steps": ["imagenet", "--resume", str(root / "nowhere"), "--steps", "5"],
        "bracketed-path": ["imagenet", "--recipe", "bn-x5", "--dataset-dir", str(root / "[/x]"), *common],
    })
    return out, run_many(commands, env)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_its_smoke_profile_through_the_cli(smoke, recipe):
    out, results = smoke
    result = results[recipe]
    assert result.returncode == 0, result.stderr
    run = Path(squeeze(result.stdout).split("results:")[1])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"] == recipe and manifest["status"] in ("complete", "diverged")
    assert manifest["profile"] == "smoke" and "shards" in manifest["dataset"]
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["step"].tolist() == [0, 2, 4]
    assert ((metrics["top1"] >= 0) & (metrics["top1"] <= metrics["top5"])).all()


def test_the_report_draws_fig2_and_the_fig3_table(smoke):
    out, results = smoke
    assert results["report"].returncode == 0, results["report"].stderr
    assert (out / "report" / "fig2_imagenet_smoke.png").is_file()
    assert "BN-x5" in (out / "report" / "imagenet.md").read_text()


@pytest.mark.parametrize(("name", "message"), [
    ("no-data", "no 'train' data"), ("bad-profile", "no profile 'huge'"), ("mnist-recipe", "not an ImageNet"),
    ("bad-key", "train.lrr"), ("no-recipe", "--recipe"), ("pack-nothing", "nothing to pack"),
    ("resume-with-steps", "drop --steps"), ("bracketed-path", "[/x]")])
def test_bad_input_is_one_line_and_exit_code_2(smoke, name, message):
    result = smoke[1][name]
    assert result.returncode == 2, result.stderr
    assert squeeze(message) in squeeze(result.stderr) and "Traceback" not in result.stderr


# --- DDP ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_replicas_count_paper_steps_and_take_the_update_one_process_takes(shards, tmp_path):
    """A step is one mini-batch of the recipe's batch size however many replicas there are.

    2 replicas x batch 4 for 2 steps (one update of 8, BN synchronised, learning rate x2 by the linear rule)
    against (a) one process x batch 4 for 2 steps: the same examples, the same step and epoch columns, and the
    learning rate the rule gives; (b) one process x batch 8 at twice the rate for 1 step: the same loss. The
    gradient itself is held to one process's in float64 by the next test: in float32 on these 32 px images, BN on
    1x1 and 2x2 maps over 8 values amplifies rounding until the two updates differ by ~10% (1% at 64 px).
    """
    common = ["imagenet", "--recipe", "bn-x5", "--profile", "smoke", "--dataset-dir", str(shards), "--device", "cpu",
              "--workers", "0", "--no-progress", "--set", "train.bn_sync=true"]
    env = cli_env(tmp_path / "cache")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "bnrepro", *common, "--out", str(tmp_path / "ddp"),
                          "--steps", "2", "--set", "profiles.smoke.batch_size=4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("results:") == 1  # only the main replica reports
    lr = recipe_io.load("bn-x5").train.lr
    results = run_many({
        "small": [*common, "--out", str(tmp_path / "small"), "--steps", "2", "--set", "profiles.smoke.batch_size=4"],
        "large": [*common, "--out", str(tmp_path / "large"), "--steps", "1", "--set", f"train.lr={2 * lr}"],
    }, env)
    assert all(r.returncode == 0 for r in results.values()), {k: r.stderr[-2000:] for k, r in results.items()}
    ddp_run, small_run, large_run = (next((tmp_path / o / "imagenet").iterdir()) for o in ("ddp", "small", "large"))
    manifest = json.loads((ddp_run / "manifest.json").read_text())
    assert manifest["replicas"] == 2 and manifest["global_batch"] == 8 and manifest["status"] == "complete"
    assert manifest["lr_factor"] == pytest.approx(8 / 32) and any("2 replicas" in d for d in manifest["deviations"])
    ddp_metrics, small_metrics = (pd.read_csv(run / "metrics.csv") for run in (ddp_run, small_run))
    pd.testing.assert_frame_equal(ddp_metrics[["step", "epoch", "statistics"]],
                                  small_metrics[["step", "epoch", "statistics"]])
    assert ddp_metrics["optimizer_step"].tolist() == [0, 1] and small_metrics["optimizer_step"].tolist() == [0, 2]
    recipe = recipe_io.load("bn-x5")
    rule = experiment.learning_rate(recipe, recipe.profiles["smoke"].model_copy(update={"batch_size": 4}),
                                    manifest["train_examples"])
    assert ddp_metrics["lr"].iloc[-1] == pytest.approx(2 * rule(0))  # the update that started at step 0, x2
    assert small_metrics["lr"].iloc[-1] == pytest.approx(rule(1))  # the last of two updates started at step 1
    large_metrics = pd.read_csv(large_run / "metrics.csv")
    # float32: the mean of two half-batch losses vs one mean over the batch (measured: 3e-6 relative)
    assert ddp_metrics["train_loss"].iloc[-1] == pytest.approx(large_metrics["train_loss"].iloc[-1], rel=1e-5)
    correct = ddp_metrics["top1"] * 12  # 12 validation images, each counted exactly once
    assert np.allclose(correct, correct.round())


def test_two_gloo_replicas_with_synchronised_bn_give_one_process_gradient_in_float64(tmp_path):
    """The Fig. 5 network (width 1/4), BN over 2 replicas x 4 examples under DDP vs one process on 8: the same
    gradient to 1e-10 in float64 (measured: 8e-14; 5e-5 in float32 on random inputs)."""
    script = Path(__file__).with_name("ddp_gradients.py")
    found = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(_free_port()), str(script)], capture_output=True, text=True, timeout=300,
                           env=cli_env(tmp_path / "cache"))
    assert found.returncode == 0, found.stderr[-3000:]
    assert float(found.stdout.split("relative difference")[1]) < 1e-10, found.stdout


def test_replica_streams_together_read_the_single_process_stream(folders):
    """Replica r of W reads steps u*W + r at update u: two replicas' first 2 updates are one process's first 4."""
    split = sources.open_split(folders, "train", shard_size=5)
    def batches(rank, world, updates):
        stream = iter(ordering.TrainingStream(split, "within_shard", 3, 4, rank, world, 0, 2))
        return [next(stream) for _ in range(updates)]
    single = batches(0, 1, 4)
    replicas = [batches(r, 2, 2) for r in (0, 1)]
    assert [replicas[0][0], replicas[1][0], replicas[0][1], replicas[1][1]] == single


def test_sigterm_mid_run_saves_a_checkpoint_and_says_how_to_resume(shards, tmp_path):
    import time

    from test_cli import start

    out = tmp_path / "out"
    proc = start("imagenet", "--recipe", "bn-x5", "--profile", "smoke", "--dataset-dir", shards, "--device", "cpu",
                 "--workers", "0", "--no-progress", "--out", out, "--steps", "100000",
                 "--set", "profiles.smoke.eval_every=1000", env=cli_env(tmp_path / "cache"))
    deadline = time.monotonic() + 120
    while not list(out.glob("imagenet/*/manifest.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the training loop by now
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    (run,) = out.glob("imagenet/*")
    assert proc.returncode == 130, stderr
    assert squeeze(f"bnrepro imagenet --resume {run}") in squeeze(stderr)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 0 < state["step"] < 100000
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_a_compiled_smoke_run_trains(folders, tmp_path):
    options = experiment.Options(folders, device="cpu", workers=0, compile=True, show_progress=False)
    run = experiment.run("bn-x5", "smoke", ["profiles.smoke.steps=2"], options, tmp_path, SINGLE_PROCESS)
    assert json.loads((run / "manifest.json").read_text())["compile"] is True
    assert pd.read_csv(run / "metrics.csv")["train_loss"].notna().iloc[-1]


def test_a_run_still_being_trained_cannot_be_resumed_by_a_second_process(tmp_path):
    import subprocess as sp

    from bnrepro.runs import RunLock

    run = tmp_path / "run"
    run.mkdir()
    RunLock.claim(run).release()  # nobody owns it
    holder = ("import sys, time; from bnrepro.runs import RunLock; RunLock.claim(sys.argv[1]); print('held', "
              "flush=True); time.sleep(30)")
    alive = sp.Popen([sys.executable, "-c", holder, str(run)], stdout=sp.PIPE, text=True)
    try:
        assert alive.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"process {alive.pid}"):
            RunLock.claim(run)
    finally:
        alive.kill()
        alive.wait()
    RunLock.claim(run).release()  # the process is gone: its stale mark does not block
    (run / "running.pid").write_text("123 some-other-host\n")
    with pytest.raises(UserError, match="delete"):
        RunLock.claim(run)


def test_synthetic_times_the_training_step_on_the_cpu_without_data(tmp_path):
    result = run_many({"synthetic": ["imagenet", "--recipe", "bn-x5", "--profile", "smoke", "--synthetic",
                                     "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "out")]},
                      cli_env(tmp_path / "cache"))["synthetic"]
    assert result.returncode == 0, result.stderr
    assert "BN-x5 (smoke), synthetic data on" in result.stdout and "images/s over 2 steps" in result.stdout
    assert not (tmp_path / "out").exists()  # nothing to keep: no run folder


def test_a_budget_that_the_replicas_do_not_divide_is_a_recorded_deviation():
    """An update covers one step per replica: 5 steps on 2 replicas train 6, and the run says so."""
    from types import SimpleNamespace

    recipe = recipe_io.load("bn-x5", ["profiles.smoke.steps=5"])
    task = SimpleNamespace(profile=recipe.profiles["smoke"], train_split=synthetic_splits(32)[0],
                           replicas=SimpleNamespace(world=2), device=torch.device("cpu"), model=None)
    found = experiment.deviations(recipe, "smoke", [], task)
    assert any("not a multiple of 2 replicas: the run trains 6 steps" in d for d in found)
    task.replicas = SimpleNamespace(world=1)
    assert not any("multiple" in d for d in experiment.deviations(recipe, "smoke", [], task))


def test_every_evaluation_measures_the_network_not_the_lag_of_the_moving_averages(fake_mnist, tmp_path):
    """BN's moving averages (here momentum 0.001: they barely leave their initial 0 and 1 while the inputs, scaled
    to [0, 50], are far from that) make the network predict one class at step 40, where Alg. 2's population
    statistics show what it has learnt. Each evaluation row says which statistics it used; training is the same."""
    data = fake_mnist / "mnist" / "raw"
    learnable = ["profiles.smoke.eval_every=40", "profiles.smoke.batch_size=32", "profiles.smoke.width=0.25",
                 "profiles.smoke.population_batches=4", "model.bn_momentum=0.001", "train.lr=0.03",
                 "data.crop_min_area=1.0", "data.crop_aspect=[1.0,1.0]", "data.flip=false",
                 "data.mean=[0,0,0]", "data.std=[0.02,0.02,0.02]"]
    population, moving = (pd.read_csv(_run("bn-x5", data, tmp_path / kind, 80, *learnable,
                                           f"eval.statistics={kind}") / "metrics.csv")
                          for kind in ("population", "moving"))
    pd.testing.assert_series_equal(population.train_loss, moving.train_loss)
    assert list(population.statistics) == ["population"] * 3
    assert list(moving.statistics) == ["population", "moving", "population"]  # step 0 and the end: always Alg. 2
    at_40 = population.step == 40
    assert moving.top5[at_40].item() == 0.5  # one class predicted for every image: 5 of 10 classes in the top 5
    assert population.top1[at_40].item() >= moving.top1[at_40].item() + 0.1  # 24.5% against 10%
    pd.testing.assert_series_equal(population.iloc[-1], moving.iloc[-1], check_names=False)
