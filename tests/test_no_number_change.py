"""Restructuring changes no number: short runs of each training path, compared row by row with the same runs made
by the code before the restructuring (issue 19, at commit c157ad5), stored in ``tests/data/no_number_change.json``.

Bit for bit on the platform that wrote the reference (same torch, same CPU flags); elsewhere a CPU's other kernels
round differently, so the rows are held to 1e-4 relative (a changed random stream or order moves them by far more).
Write a new reference (only when a number is meant to change, saying why in the commit) with
``BNREPRO_WRITE_REFERENCE=1 pytest tests/test_no_number_change.py``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pandas as pd
import torch
from test_imagenet import write_images

from bnrepro.data.pack import pack
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.evaluate import ensemble
from bnrepro.experiments import imagenet
from bnrepro.experiments import mnist as mnist_experiment

REFERENCE = Path(__file__).parent / "data" / "no_number_change.json"
WRITE = os.environ.get("BNREPRO_WRITE_REFERENCE") == "1"


def _platform() -> dict[str, str]:
    """What decides the last bit of a CPU float: torch's version and build, and the CPU's vector extensions."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "")
        flags = " ".join(sorted(f for f in line.split() if f.startswith(("avx", "fma", "amx", "sse4"))))
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu_flags": flags,
            "capability": torch.backends.cpu.get_cpu_capability()}


def _imagenet_rows(recipe: str, profile: str, data: Path, out: Path, sets: list[str]) -> list[dict]:
    options = imagenet.Options(data, device="cpu", workers=0, show_progress=False)
    run = imagenet.run(recipe, profile, sets, options, out, SINGLE_PROCESS)
    return pd.read_csv(run / "metrics.csv").to_dict(orient="records")


def _runs(fake_mnist: Path, tmp_path: Path) -> dict[str, list[dict]]:
    """The runs: the cpu profile on resident idx files (BN-Baseline: BN, dropout, LRN, full distortions), the smoke
    profile on class folders and on tar shards read by the file path (BN-x5: within-shard shuffling, reduced
    distortions; Inception), two ensemble members evaluated at 1, 10 and 144 crops, and both MNIST variants of Fig. 1
    on both engines, alone and in a sweep's grid."""
    folders = write_images(tmp_path / "folders", ["cat", "dog", "owl"], {"train": 12, "val": 4})
    shards = tmp_path / "shards"
    pack(folders, shards, shard_size=5, seed=0)
    cpu = ["profiles.cpu.steps=8", "profiles.cpu.eval_every=4", "profiles.cpu.population_batches=2",
           "profiles.cpu.batch_size=32",
           # the Fashion-MNIST cpu profile's crops and compression, as when the reference was written (the CIFAR-10
           # profile that replaced it crops whole images): the code is compared, not the profile
           "profiles.cpu.crop_min_area=0.08", "profiles.cpu.compression=1.2903226e-4"]
    smoke = ["profiles.smoke.steps=6", "profiles.smoke.eval_every=3"]
    rows = {
        "cpu bn-baseline resident": _imagenet_rows("bn-baseline", "cpu", fake_mnist / "mnist" / "raw",
                                                   tmp_path / "a", cpu),
        "smoke bn-x5 shards": _imagenet_rows("bn-x5", "smoke", shards, tmp_path / "b", smoke),
        "smoke inception folders": _imagenet_rows("inception", "smoke", folders, tmp_path / "c", smoke),
    }
    members = [imagenet.run(name, "smoke", ["profiles.smoke.steps=3"],
                            imagenet.Options(folders, device="cpu", workers=0, show_progress=False),
                            tmp_path / "members", SINGLE_PROCESS)
               for name in ("imagenet/ensemble/bn-x30-member1", "imagenet/ensemble/bn-x30-member6")]
    evaluated = ensemble.run("ensemble/bn-inception", ["profile=smoke", "crops=[1, 10, 144]"], tmp_path, folders,
                             tmp_path / "ensemble", "cpu", 0, member_runs=members, show_progress=False)
    rows["ensemble smoke folders"] = pd.read_csv(evaluated / "results.csv").to_dict(orient="records")
    rows["ensemble probabilities"] = [  # the errors of 12 images are coarse: every member's every probability
        {"member": member, "crops": crops, "index": int(i), "class": c, "p": float(p)}
        for (member, crops), part in sorted(ensemble.load_cache(evaluated).items())
        for i, probs in zip(part["indices"], part["probs"].float()) for c, p in enumerate(probs.tolist())]
    for engine in ("torch", "native"):
        if engine == "native":
            from bnrepro import native
            try:
                native.library("mlp")
            except native.Unavailable:
                continue
        quick = ["train.steps=60", "eval.every=20", "eval.population_batches=5"]
        run = mnist_experiment.run(mnist_experiment.DEFAULT_VARIANTS, quick, 2, 0, "cpu", tmp_path / engine,
                                   fake_mnist, show_progress=False, engine=engine)
        rows[f"mnist {engine}"] = pd.read_csv(run / "metrics.csv").to_dict(orient="records")
        grid = mnist_experiment.Grid((0.1, 2.0), (0.05, 0.5))
        run = mnist_experiment.run(mnist_experiment.DEFAULT_VARIANTS, quick, 1, 0, "cpu", tmp_path / engine,
                                   fake_mnist, show_progress=False, engine=engine, grid=grid)
        rows[f"sweep {engine}"] = pd.read_csv(run / "metrics.csv").to_dict(orient="records")
    return rows


def test_every_metrics_row_is_the_one_the_code_gave_before_the_restructuring(fake_mnist, tmp_path):
    rows = _runs(fake_mnist, tmp_path)
    if WRITE:
        REFERENCE.write_text(json.dumps({"platform": _platform(), "runs": rows}, indent=1) + "\n")
    reference = json.loads(REFERENCE.read_text())
    exact = reference["platform"] == _platform()
    for name, expected in reference["runs"].items():
        if name not in rows:  # the native engine: no C++ compiler here
            continue
        got, want = pd.DataFrame(rows[name]), pd.DataFrame(expected)
        if exact:
            pd.testing.assert_frame_equal(got, want, check_exact=True, obj=name)
        else:
            pd.testing.assert_frame_equal(got, want, rtol=1e-4, atol=1e-6, obj=name)
    assert set(rows) <= set(reference["runs"]), "a run without a reference"


