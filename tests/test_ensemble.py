"""`bnrepro ensemble` on CPU with small trained members: 1/10/144 crops, averaging, the probability cache and
its recombination, agreement with the trainer's own evaluation, and bad members (clear error, exit code 2)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import SHARED_DATA, write_mnist
from test_cli import cli_env, run_many
from test_imagenet import write_images
from torchvision.io import encode_png

from bnrepro.data import augment, pipeline, sources, transforms
from bnrepro.data.sources.folders import imagenet_wnids
from bnrepro.data.split import Split, decode
from bnrepro.engine import checkpoint
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.errors import UserError
from bnrepro.evaluate import ensemble as evaluation
from bnrepro.evaluate.crops import crops_of, distinct_crops_of, distinct_views
from bnrepro.experiments import imagenet as experiment
from bnrepro.models.batchnorm import use_statistics
from bnrepro.models.inception import Inception, InceptionConfig, fold

MEMBERS = ["imagenet/ensemble/bn-x30-member1", "imagenet/ensemble/bn-x30-member6"]  # plain, and per-activation BN
SMOKE = ["profile=smoke", f"members=[{', '.join(MEMBERS)}]"]


def train(recipe: str, data: Path, out: Path, steps: int = 3, overrides: tuple[str, ...] = ()) -> Path:
    options = experiment.Options(data, device="cpu", workers=0, show_progress=False)
    return experiment.run(recipe, "smoke", [f"profiles.smoke.steps={steps}", *overrides], options, out,
                          SINGLE_PROCESS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    data = write_images(root / "data", ["cat", "dog", "owl"], {"train": 8, "val": 4})
    runs = [train(name, data, root / "results") for name in MEMBERS]
    return root, data, runs


@pytest.fixture(scope="module")
def evaluated(trained):
    root, data, _ = trained
    run = evaluation.run("ensemble/bn-inception", SMOKE + ["crops=[1, 10, 144]"], root / "results", data,
                         root / "results", "cpu", 0, show_progress=False)
    return run


def test_every_member_and_the_ensemble_get_a_row_per_crop_scheme(evaluated):
    results = pd.read_csv(evaluated / "results.csv")
    assert len(results) == 3 * 3  # (2 members + ensemble) x (1, 10, 144 crops)
    assert set(results["crops"]) == {1, 10, 144} and set(results["models"]) == {1, 2}
    assert ((results["top1_error"] >= results["top5_error"]) & (results["top1_error"] <= 1)).all()
    manifest = json.loads((evaluated / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["val_images"] == 12
    assert [m["name"] for m in manifest["members"]] == ["bn-x30-member1", "bn-x30-member6"]


def test_the_ensemble_is_the_mean_of_the_cached_member_probabilities(evaluated):
    cached = evaluation.load_cache(evaluated)
    a, b = cached[("bn-x30-member1", 144)], cached[("bn-x30-member6", 144)]
    assert a["probs"].shape == (12, 3) and torch.allclose(a["probs"].float().sum(1), torch.ones(12), atol=1e-2)
    mean, labels = evaluation.combine(cached, ["bn-x30-member1", "bn-x30-member6"], 144)
    torch.testing.assert_close(mean, (a["probs"].float() + b["probs"].float()) / 2)
    results = pd.read_csv(evaluated / "results.csv")
    row = results[(results.models == 2) & (results.crops == 144)].iloc[0]
    assert (row.top1_error, row.top5_error) == pytest.approx(evaluation.errors(mean, labels))
    recombined = evaluation.table(cached, ["bn-x30-member6"], [10])  # any subset, without running a network
    assert recombined.iloc[0].top1_error == pytest.approx(
        results[(results.members == "bn-x30-member6") & (results.crops == 10)].iloc[0].top1_error)


def pictures(split: Split) -> list[torch.Tensor]:
    return [decode(torch.frombuffer(bytearray(split.read(i)), dtype=torch.uint8)) for i in range(len(split))]


def trainers_evaluation(run: Path, data: Path, eval_resize: float | None = None):
    """A run's member (the ensemble's network, folded in float32), its validation split, the trainer's
    evaluation view of every image (its transform through its own dataset path: decode, then transform;
    ``eval_resize`` replaces the recipe's), that view normalized in float64, and the trainer's network in
    float64, inferring as the trainer's final evaluation did (Alg. 2's population statistics)."""
    member = evaluation.load_member(run, torch.device("cpu"))
    recipe, classes = member.recipe, member.manifest["classes"]
    split = sources.open_split(data, "val", classes)
    view = transforms.evaluation_transform(member.resolution, eval_resize or recipe.data.eval_resize)
    examples = pipeline.Examples(split, view, 0, jpegs_as_bytes=False)
    seen = torch.stack([examples[(i, i)][0] for i in range(len(split))])
    mean = torch.tensor([255 * m for m in recipe.data.mean], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in recipe.data.std], dtype=torch.float64).view(1, 3, 1, 1)
    width = recipe.profiles[member.manifest["profile"]].width
    trainer_net = Inception(InceptionConfig(recipe.model, width, len(classes)))
    trainer_net.load_state_dict(checkpoint.load(run / "checkpoint.pt")["model"])
    if recipe.model.batch_norm:
        use_statistics(trainer_net, "population")
    return member, split, seen, (seen.double() - mean) / std, trainer_net.eval().double()


def test_single_crop_is_exactly_the_trainers_own_evaluation(trained, evaluated):
    """1 crop through the folded (Alg. 2) network = the trainer's final single-crop evaluation of that run: the
    same pixels, the same class probabilities in float64, so the same predicted class for every image.

    Measured on these members (CPU): the smallest top-1 margin (p_top1 - p_top2) is 0.12 (member6) and 0.18
    (member1), while float32 vs float64 differ by < 1e-5 in a probability, the float32 fold by < 2e-6, and
    the cache's float16 storage by < 2.5e-4; so no rounding can flip a prediction and all must agree exactly."""
    _, data, runs = trained
    cached = evaluation.load_cache(evaluated)
    results = pd.read_csv(evaluated / "results.csv")
    for run in runs:
        member, split, seen, x, trainer_net = trainers_evaluation(run, data)
        assert torch.equal(torch.cat([crops_of(p, 1, member.resolution, member.recipe.data.eval_resize)
                                      for p in pictures(split)]), seen)  # the ensemble's 1 crop: the same pixels
        with torch.no_grad():
            expected = trainer_net(x).softmax(1)
            folded64 = fold(trainer_net)(x).softmax(1)  # folded in float64: only the fold's algebra differs
            folded32 = member.model.double()(x).softmax(1)  # the ensemble's float32 fold, run in float64
        torch.testing.assert_close(folded64, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(folded32, expected, rtol=0, atol=1e-5)
        predicted = expected.argmax(1)
        assert torch.equal(folded64.argmax(1), predicted) and torch.equal(folded32.argmax(1), predicted)
        # the trainer's own number (its float32 evaluation) and the ensemble's cache and table (float32, then
        # stored as float16) agree with the float64 reference exactly on every predicted class
        labels = torch.as_tensor(split.labels, dtype=torch.long)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["final_top1"] == pytest.approx((predicted == labels).double().mean().item(), abs=1e-12)
        part = cached[(member.name, 1)]
        assert torch.equal(part["labels"], labels[part["indices"]]) and len(part["indices"]) == len(split)
        torch.testing.assert_close(part["probs"].double(), expected[part["indices"]], rtol=0, atol=5e-4)
        assert torch.equal(part["probs"].float().argmax(1), predicted[part["indices"]])
        row = results[(results.members == member.name) & (results.crops == 1)].iloc[0]
        assert 1 - row.top1_error == pytest.approx(summary["final_top1"], abs=1e-12)


class CountingNet(torch.nn.Module):
    """A tiny classifier of 3 classes that counts the views (rows) it is run on."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)
            self.fc = torch.nn.Linear(8, 3)
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return 20 * self.fc(self.conv(x).relu().mean((2, 3)))  # x 20: views' probabilities differ


def square_images(root: Path, side: int, count: int) -> Path:
    """``count`` random ``side`` x ``side`` PNGs in each of 3 class folders of a validation split."""
    generator = torch.Generator().manual_seed(2)
    for name in ("cat", "dog", "owl"):
        (root / "val" / name).mkdir(parents=True)
        for i in range(count):
            pixels = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=generator)
            (root / "val" / name / f"{i}.png").write_bytes(encode_png(pixels).numpy().tobytes())
    return root


@pytest.mark.parametrize("square", [True, False])
def test_144_crops_run_the_network_once_per_distinct_view_and_average_all_144(trained, tmp_path, square):
    """The ensemble's 144-crop probabilities of an image are the plain mean over all 144 views (each repeated view
    counted as often as it occurs, GoogLeNet's average), though the network sees only the distinct views: 48 of a
    square image's 144, 144 or 140 of the smoke data's 40 x 30 and 30 x 44 ones."""
    _, data, runs = trained
    member = evaluation.load_member(runs[0], torch.device("cpu"))
    member = dataclasses.replace(member, model=CountingNet())
    data = square_images(tmp_path / "square", 32, 3) if square else data
    split = sources.open_split(data, "val", member.manifest["classes"])
    probs, _, indices, _ = evaluation.probabilities(member, split, 144, torch.device("cpu"), 288, 0)
    images = pictures(split)
    resize = member.recipe.data.eval_resize
    with torch.no_grad():
        expected = torch.stack([member.model(member.transforms.normalize(crops_of(image, 144, member.resolution,
                                                                                  resize))).softmax(1).mean(0)
                                for image in images])
    torch.testing.assert_close(probs, expected[indices], rtol=1e-6, atol=1e-9)  # float rounding at most (here: equal)
    distinct = [distinct_views(*image.shape[-2:], 144, member.resolution, resize) for image in images]
    assert member.model.rows - 144 * len(images) == sum(distinct)  # the evaluation's rows, then the check's
    if not square:  # views of unequal counts: the plain mean over the distinct views alone is another number, far
        # outside the tolerance above for every image with a repeated view (2e-6 to 7e-5 here)
        with torch.no_grad():
            unweighted = torch.stack([member.model(member.transforms.normalize(distinct_crops_of(
                image, 144, member.resolution, resize)[0])).softmax(1).mean(0) for image in images])
        assert ((unweighted - expected).abs().amax(1) > 1e-6).sum() == sum(n < 144 for n in distinct) > 0
    assert sum(distinct) == (48 * len(images) if square else sum(144 if i.shape[-2] > i.shape[-1] else 140
                                                                 for i in images))


def test_single_crop_uses_the_members_own_eval_resize(trained, tmp_path):
    """A member trained with another ``data.eval_resize`` is evaluated at 1 crop with that resize, as its trainer
    evaluated it (shorter side 48 for 32-px crops here, not 37)."""
    _, data, _ = trained
    run = train(MEMBERS[0], data, tmp_path / "results", steps=1, overrides=("data.eval_resize=1.5",))
    out = evaluation.run("ensemble/bn-inception", ["profile=smoke", "crops=[1]"], tmp_path, data, tmp_path, "cpu",
                         0, member_runs=[run], show_progress=False)
    part = evaluation.load_cache(out)[("bn-x30-member1", 1)]
    _, _, _, x, trainer_net = trainers_evaluation(run, data)
    _, _, _, x_usual, _ = trainers_evaluation(run, data, eval_resize=256 / 224)
    with torch.no_grad():
        expected, usual = trainer_net(x).softmax(1), trainer_net(x_usual).softmax(1)
    torch.testing.assert_close(part["probs"].double(), expected[part["indices"]], rtol=0, atol=5e-4)
    assert (usual - expected).abs().max() > 1e-2  # the resize matters, so the check above can tell them apart
    assert torch.equal(part["probs"].float().argmax(1), expected.argmax(1)[part["indices"]])


def test_a_resident_members_single_crop_is_its_trainers_float_view(tmp_path):
    """A member trained on idx files (held resident, so its trainer evaluated views resampled in float, never
    rounded) is evaluated at 1 crop on that same float view: the same top-1 as the trainer's final evaluation, the
    same predictions as its network on ``augment.evaluation_view`` in float64. The manifest names the data, the
    view, the image size and how many of the 144 views of a 28 x 28 image are distinct (48)."""
    data = write_mnist(tmp_path / "data", n_train=64, n_test=24) / "mnist" / "raw"
    run = train(MEMBERS[0], data, tmp_path / "results", steps=2)
    out = evaluation.run("ensemble/bn-inception", ["profile=smoke", "crops=[1, 144]"], tmp_path, data, tmp_path, "cpu",
                         0, member_runs=[run], show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["members"][0]["single_crop_view"] == "float" and manifest["image_size"] == [28, 28]
    assert manifest["distinct_views"] == {"1": 1, "144": 48}
    assert manifest["data_identity"] == sources.data_identity(data)
    member = evaluation.load_member(run, torch.device("cpu"))
    split = sources.open_split(data, "val", member.manifest["classes"])
    recipe = member.recipe
    x = augment.evaluation_view(split.pixels, member.resolution, recipe.data.eval_resize).double()
    mean = torch.tensor([255 * m for m in recipe.data.mean], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in recipe.data.std], dtype=torch.float64).view(1, 3, 1, 1)
    net = Inception(InceptionConfig(recipe.model, recipe.profiles["smoke"].width, len(split.classes)))
    net.load_state_dict(checkpoint.load(run / "checkpoint.pt")["model"])
    use_statistics(net, "population")
    with torch.no_grad():
        expected = net.eval().double()((x - mean) / std).softmax(1)
    part = evaluation.load_cache(out)[("bn-x30-member1", 1)]
    assert torch.equal(part["probs"].float().argmax(1), expected.argmax(1)[part["indices"]])
    torch.testing.assert_close(part["probs"].double(), expected[part["indices"]], rtol=0, atol=5e-4)
    summary = json.loads((run / "summary.json").read_text())
    row = pd.read_csv(out / "results.csv").query("crops == 1").iloc[0]
    assert 1 - row.top1_error == pytest.approx(summary["final_top1"], abs=1e-12)


def test_members_come_from_explicit_run_folders_too(trained, tmp_path):
    root, data, runs = trained
    run = evaluation.run("ensemble/bn-inception", ["profile=smoke", "crops=[1]"], tmp_path, data, tmp_path, "cpu",
                         0, member_runs=runs[:1], show_progress=False)
    assert pd.read_csv(run / "results.csv")["members"].tolist() == ["bn-x30-member1"]


def test_a_missing_run_checkpoint_or_mismatched_member_is_a_clear_error(trained, tmp_path):
    root, data, runs = trained
    with pytest.raises(UserError, match="no finished run of 'bn-x30-member2'"):
        evaluation.run("ensemble/bn-inception", ["profile=smoke"], root / "results", data, tmp_path, "cpu", 0,
                       show_progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(runs[0], broken)
    (broken / "checkpoint.pt").unlink()
    with pytest.raises(UserError, match="no checkpoint"):
        evaluation.load_member(broken, torch.device("cpu"))
    recipe = yaml.safe_load((broken / "recipe.yaml").read_text())
    recipe["model"]["per_activation_bn"] = True  # the recipe no longer describes the saved network
    (broken / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shutil.copy(runs[0] / "checkpoint.pt", broken / "checkpoint.pt")
    with pytest.raises(UserError, match="does not fit"):
        evaluation.load_member(broken, torch.device("cpu"))
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="checkpoint .* is damaged .*member bn-x30-member1 cannot be evaluated"):
        evaluation.load_member(broken, torch.device("cpu"))


def test_bad_ensemble_input_through_the_cli_is_one_line_and_exit_code_2(trained, tmp_path):
    root, data, runs = trained
    common = ["ensemble", "--results", str(root / "results"), "--out", str(tmp_path), "--device", "cpu",
              "--workers", "0", "--no-progress"]
    found = run_many({
        "no-data": common,
        "no-member-run": [*common, "--dataset-dir", str(data), "--set", "profile=smoke"],
        "not-a-run": [*common, "--dataset-dir", str(data), "--member", str(tmp_path)],
    }, cli_env(tmp_path / "cache"))
    for name, message in [("no-data", "--dataset-dir"), ("no-member-run", "no finished run"),
                          ("not-a-run", "not a `bnrepro imagenet` run folder")]:
        assert found[name].returncode == 2, found[name].stderr
        assert message in found[name].stderr and "Traceback" not in found[name].stderr


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-sample").is_dir(), reason="shared/data/imagenet-sample is absent")
def test_the_real_imagenet_sample_is_evaluated_with_standard_labels(tmp_path):
    """A member trained on folders named by wnid has the 1000 classes; the 250 real photos keep their labels."""
    data = write_images(tmp_path / "data", ["n01440764", "n01494475"], {"train": 4, "val": 1})
    run = train(MEMBERS[0], data, tmp_path / "results", steps=1)
    out = evaluation.run("ensemble/bn-inception", ["profile=smoke", "crops=[1]"], tmp_path, SHARED_DATA /
                         "imagenet-sample", tmp_path, "cpu", 0, member_runs=[run], show_progress=False)
    cached = evaluation.load_cache(out)[("bn-x30-member1", 1)]
    assert cached["probs"].shape == (250, 1000)
    split = sources.open_split(SHARED_DATA / "imagenet-sample", "val", imagenet_wnids())
    assert sorted(cached["labels"].tolist()) == list(range(0, 1000, 4))  # every 4th class, one photo each
    assert cached["labels"].tolist() == split.labels.tolist() and cached["indices"].tolist() == list(range(250))
    assert [imagenet_wnids()[label] for label in cached["labels"]] == [Path(f).parent.name for f in split.files]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_gives_the_cpus_errors(trained, evaluated, tmp_path):
    root, data, _ = trained
    run = evaluation.run("ensemble/bn-inception", SMOKE + ["crops=[1, 10, 144]"], root / "results", data, tmp_path,
                         "cuda", 2, show_progress=False)
    on_gpu, on_cpu = (evaluation.load_cache(r) for r in (run, evaluated))
    for key, part in on_cpu.items():  # bf16 autocast on the GPU: probabilities agree to about 1e-2
        torch.testing.assert_close(on_gpu[key]["probs"].float(), part["probs"].float(), atol=3e-2, rtol=0)
