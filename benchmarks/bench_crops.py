"""144-crop evaluation speed (Fig. 4): bnrepro's crop path against a plain PIL loop, in one invocation.

GoogLeNet's 144 crops of one image (bnrepro.evaluate.crops): shorter side 256/288/320/352, the left/centre/
right squares, from each square 4 corners + centre crop of 224 and the square resized to 224, and the mirror
of each. bnrepro builds them from a decoded uint8 tensor with torchvision resizes on the evaluation device
(``crops_of``); the plain loop is what one would write first: PIL decode, ``Image.resize`` (bilinear, as
torchvision's antialiased resize), ``crop``, ``ImageOps.mirror``, ``pil_to_tensor`` one crop at a time, then
``torch.stack``. Both cut the same boxes (``crops.boxes`` and ``crops.resized_shape`` give the geometry to
both), so any difference is in the decoding and resizing code alone, and the check below prints it.

Two measurements, images/s for each side and the ratio bnrepro / plain:

1. crop building only, no network: bnrepro = read + ``decode_image`` (the item of ``pipeline.Examples`` that
   ``ensemble.probabilities`` loads) + ``crops_of(image, 144, size)`` + float normalize; plain = the PIL loop
   + the same normalize. One image warms up each side; then ``--rounds`` alternating passes over the images,
   and each side's best pass is reported (the machine may be shared).
2. full evaluation: the Fig. 5 network (``Inception(InceptionConfig(switches()))``, freshly initialised,
   BN folded in, as ``load_member`` does) on the 144 crops in chunks of ``--batch-crops``, softmax, mean over
   crops. bnrepro's side is ``ensemble.probabilities`` itself (DataLoader with ``--workers``, crops on the
   device, bf16 autocast and channels_last on CUDA); the plain side runs the PIL crops through the same
   network the same way, one image at a time in the main process. The network dominates: about 2 GMAC per
   224-px crop, so about 290 GMAC per image, seconds per image on a CPU. For a quick check use a smaller
   ``--size`` (the scales follow it: 64 px gives shorter sides 73-101). One forward pass of one chunk of
   zeros warms the network up first; bnrepro's time includes starting its DataLoader workers, as each
   (member, scheme) of ``bnrepro ensemble`` does, which matters only for a handful of images.

On a CPU that other work is using, torch's intra-op threads wait on each other and the timings swing by
several times from run to run; ``--threads 1`` steadies them.

    python benchmarks/bench_crops.py --images 8 --no-network
    python benchmarks/bench_crops.py --images 2 --size 224 --device cpu --threads 1 --rounds 1
    python benchmarks/bench_crops.py --images 32 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from bnrepro import recipes
from bnrepro.data import pipeline, sources
from bnrepro.data.split import Split
from bnrepro.engine.timing import clock
from bnrepro.evaluate import ensemble
from bnrepro.evaluate.crops import boxes, crops_of, resized_shape
from bnrepro.models.batchnorm import estimate_population, use_statistics
from bnrepro.models.inception import Inception, InceptionConfig, count_flops, fold, switches
from bnrepro.runs import device_name, resolve_device

CROPS = 144


def first_images(dataset_dir: Path, n: int) -> Split:
    """The first ``n`` examples of ``dataset_dir``'s validation split (folders or shards)."""
    split = sources.open_split(dataset_dir, "val")
    if n > len(split):
        raise SystemExit(f"--images {n}, but {split.where} holds only {len(split)} images")
    return dataclasses.replace(split, file_of=split.file_of[:n], offset=split.offset[:n], size=split.size[:n],
                               labels=split.labels[:n])


# --- the two ways of building the crops ------------------------------------------------------------------


def bnrepro_crops(examples: pipeline.Examples, i: int, size: int, device: torch.device) -> torch.Tensor:
    """uint8 (144, 3, size, size) as ensemble.probabilities builds them: the loader's item, then crops_of."""
    image, _, _ = examples[(i, i)]
    return crops_of(image.to(device, non_blocking=True), CROPS, size)


def pil_image(split: Split, i: int) -> Image.Image:
    source = io.BytesIO(split.read(i)) if split.sharded else split.files[split.file_of[i]]
    with Image.open(source) as image:
        return image.convert("RGB")


def plain_crops(split: Split, i: int, size: int) -> torch.Tensor:
    """The same 144 views, cut and resized with PIL one image and one crop at a time: uint8 on the CPU."""
    img = pil_image(split, i)
    resized: dict[int, Image.Image] = {}
    unmirrored: dict[tuple[int, int, int, int], Image.Image] = {}
    out = []
    for box in boxes(img.height, img.width, CROPS, size):
        if box.scale not in resized:
            h, w = resized_shape(img.height, img.width, box.scale)
            resized[box.scale] = img.resize((w, h), Image.BILINEAR)
        key = (box.scale, box.top, box.left, box.side)
        if key not in unmirrored:
            view = resized[box.scale].crop((box.left, box.top, box.left + box.side, box.top + box.side))
            unmirrored[key] = view if box.side == size else view.resize((size, size), Image.BILINEAR)
        view = unmirrored[key]
        out.append(pil_to_tensor(ImageOps.mirror(view) if box.mirror else view))
    return torch.stack(out)


def normalize(views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return views.float().sub_(mean).div_(std)


# --- 1. crop building --------------------------------------------------------------------------------------


def time_crops(split: Split, size: int, device: torch.device, mean: torch.Tensor, std: torch.Tensor,
               rounds: int) -> tuple[float, float]:
    """Best images/s over ``rounds`` passes of each side (alternating), after one warm-up image each."""
    examples = pipeline.Examples(split, v2.Identity(), 0, jpegs_as_bytes=False)
    sides = {
        "bnrepro": lambda i: normalize(bnrepro_crops(examples, i, size, device), mean, std),
        "plain": lambda i: normalize(plain_crops(split, i, size).to(device, non_blocking=True), mean, std),
    }
    best = dict.fromkeys(sides, 0.0)
    for build in sides.values():
        build(0)
    for _ in range(rounds):
        for name, build in sides.items():
            start = clock(device)
            for i in range(len(split)):
                build(i)
            best[name] = max(best[name], len(split) / (clock(device) - start))
    return best["bnrepro"], best["plain"]


def agreement(split: Split, size: int) -> tuple[float, int, float]:
    """On the first image: mean and max |bnrepro - plain| of the uint8 crop stacks, and the mean |difference|
    of the two decoders alone (torchvision decode_image against PIL), all in uint8 units."""
    examples = pipeline.Examples(split, v2.Identity(), 0, jpegs_as_bytes=False)
    ours = bnrepro_crops(examples, 0, size, torch.device("cpu")).int()
    theirs = plain_crops(split, 0, size).int()
    decoded = examples[(0, 0)][0].int()
    decode_gap = (decoded - pil_to_tensor(pil_image(split, 0)).int()).abs().float().mean().item()
    gap = (ours - theirs).abs()
    return gap.float().mean().item(), int(gap.max()), decode_gap


# --- 2. full evaluation ------------------------------------------------------------------------------------


def network(device: torch.device) -> Inception:
    """The Fig. 5 network, freshly initialised, with Alg. 2's statistics of two random batches, BN folded."""
    torch.manual_seed(0)
    model = Inception(InceptionConfig(switches()))
    with torch.no_grad():
        estimate_population(model, lambda: [model(torch.randn(8, 3, 224, 224)) for _ in range(2)])
    use_statistics(model, "population")
    model = fold(model).to(device)  # fold returns it in eval mode
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


@torch.no_grad()
def forward(model: Inception, x: torch.Tensor, batch_crops: int) -> torch.Tensor:
    """Logits of a normalized float batch in chunks, as ensemble.probabilities runs them."""
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        return torch.cat([model(chunk) for chunk in x.split(batch_crops)]).float()


def bnrepro_evaluation(member: ensemble.Member, split: Split, device: torch.device, batch_crops: int,
                       workers: int) -> tuple[float, torch.Tensor]:
    start = clock(device)
    probs, _, indices, skipped = ensemble.probabilities(member, split, CROPS, device, batch_crops, workers)
    rate = len(split) / (clock(device) - start)
    if skipped or indices.tolist() != list(range(len(split))):
        raise SystemExit(f"probabilities skipped {skipped} unreadable images; the timing would not compare")
    return rate, probs


@torch.no_grad()
def plain_evaluation(model: Inception, split: Split, size: int, device: torch.device, mean: torch.Tensor,
                     std: torch.Tensor, batch_crops: int) -> tuple[float, torch.Tensor]:
    found = []
    start = clock(device)
    for i in range(len(split)):
        x = normalize(plain_crops(split, i, size).to(device, non_blocking=True), mean, std)
        found.append(forward(model, x, batch_crops).softmax(1).mean(0).cpu())
    return len(split) / (clock(device) - start), torch.stack(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, default=Path("/work/shared/data/imagenet-sample"),
                        help="val/<class>/*.JPEG (or bnrepro pack shards); the first --images are used")
    parser.add_argument("--images", type=int, default=4, help="images timed per side")
    parser.add_argument("--size", type=int, default=224, help="crop size; the four scales follow it")
    parser.add_argument("--rounds", type=int, default=3, help="crop building: passes per side, the best counts")
    parser.add_argument("--batch-crops", type=int, default=CROPS,
                        help="crops per forward pass (the ensemble recipe uses 288: two images)")
    parser.add_argument("--workers", type=int, default=2, help="bnrepro side: DataLoader worker processes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--recipe", default="bn-x30", help="for data.mean/std, as a member's recipe")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-network", action="store_true", help="measure crop building only")
    args = parser.parse_args()
    if args.images < 1 or args.rounds < 1 or args.batch_crops < 1 or args.workers < 0 or args.size < 8 \
            or args.threads < 0:
        parser.error("--images, --rounds and --batch-crops must be at least 1, --workers and --threads at least 0, "
                     "--size at least 8")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    recipe = recipes.load(args.recipe, [f"profiles.smoke.resolution={args.size}"])
    if not isinstance(recipe, recipes.ImagenetRecipe):
        parser.error(f"recipe '{args.recipe}' is not an ImageNet recipe")
    mean = torch.tensor([255 * m for m in recipe.data.mean], device=device).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in recipe.data.std], device=device).view(1, 3, 1, 1)
    split = first_images(args.dataset_dir, args.images)

    mad, worst, decode_gap = agreement(split, args.size)
    crops_ours, crops_plain = time_crops(split, args.size, device, mean, std, args.rounds)
    if not args.no_network:
        model = network(device)
        member = ensemble.Member("bench", Path("."), recipe, {"profile": "smoke", "classes": split.classes}, model)
        warm = torch.zeros(min(args.batch_crops, CROPS), 3, args.size, args.size, device=device)
        forward(model, warm, args.batch_crops)  # warm-up at the timed shape: kernel selection, allocator
        eval_ours, probs_ours = bnrepro_evaluation(member, split, device, args.batch_crops, args.workers)
        eval_plain, probs_plain = plain_evaluation(model, split, args.size, device, mean, std, args.batch_crops)
        macs = count_flops(Inception(InceptionConfig(switches())), args.size)

    scales = [round(args.size * s / 224) for s in (256, 288, 320, 352)]
    print(f"device: {device_name(device)}; torch {torch.__version__}"
          f"{'; bf16 autocast, channels_last' if device.type == 'cuda' else '; fp32'}")
    print(f"data: the first {len(split)} images of {split.where}; {CROPS} crops of {args.size} px (shorter sides "
          f"{'/'.join(map(str, scales))}); crop building: best of {args.rounds} passes after 1 warm-up image")
    print(f"crop check (image 0): mean |bnrepro - plain| {mad:.3f} uint8 units, max {worst}; "
          f"of which decoding alone (decode_image vs PIL): mean {decode_gap:.3f}")
    if not args.no_network:
        gap = (probs_ours - probs_plain).abs().max().item()
        same = (probs_ours.argmax(1) == probs_plain.argmax(1)).sum().item()
        print(f"network: Inception(InceptionConfig(switches())), random init, BN folded; "
              f"{macs / 1e9:.2f} GMAC per crop, {CROPS * macs / 1e9:.0f} GMAC per image; {args.batch_crops} crops "
              f"per forward; bnrepro side {args.workers} DataLoader workers, plain side in the main process")
        spread = (probs_plain.amax(1) - probs_plain.amin(1)).min().item()  # a random network is near uniform
        print(f"probability check: max |bnrepro - plain| {gap:.2e}, against a spread (max - min over the classes) "
              f"of at least {spread:.2e}; top-1 class agrees on {same}/{len(split)}")

    print(f"\n| {len(split)} images, {args.size} px | plain PIL loop, images/s | bnrepro, images/s | bnrepro / plain |")
    print("|---|---|---|---|")
    print(f"| 1. crop building (no network) | {crops_plain:,.2f} | {crops_ours:,.2f} | "
          f"{crops_ours / crops_plain:.2f}x |")
    if not args.no_network:
        print(f"| 2. full evaluation (network) | {eval_plain:,.3f} | {eval_ours:,.3f} | "
              f"{eval_ours / eval_plain:.2f}x |")


if __name__ == "__main__":
    main()
