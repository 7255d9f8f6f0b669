"""The small Markdown and text helpers the reports share: a table, a commit, a run's data and deviations, steps as
the paper writes them, each written one way in every report, and no folder of the machine a run ran on."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd


def short_commit(commit: object) -> str:
    """A recorded commit as the reports show it: 12 hex digits, keeping ``+dirty`` (code that no commit holds)."""
    if not commit:
        return "not recorded"
    text = str(commit)
    head, dirty, _ = text.partition("+dirty")
    return head[:12] + dirty


# " in <folder>" of a split's description, and any other absolute path: the reports name no folder of the machine
# a run ran on (manifest.json keeps it).
_IN_FOLDER = re.compile(r" in (?=[^\s,;()]*[/\\])[^\s,;()]+")
_ABSOLUTE = re.compile(r"(?<![\w.~])(?:/|[A-Za-z]:[/\\])[^\s,;()`]*")


def without_paths(text: str) -> str:
    """``text`` without the folders it names: " in <folder>" dropped, any other absolute path cut to its last two
    parts (``…/imagenet/train``)."""
    def tail(match: re.Match) -> str:
        parts = [part for part in re.split(r"[/\\]", match.group(0)) if part and not part.endswith(":")]
        return "…/" + "/".join(parts[-2:])
    return _ABSOLUTE.sub(tail, _IN_FOLDER.sub("", text))


def data_text(manifest: dict) -> str:
    """The data a run (or an evaluation) used, by name, counts and digest (its ``data_identity``); for a manifest
    from before ``data_identity``, its ``dataset`` description without paths, digest not recorded."""
    identity = manifest.get("data_identity")
    if identity:
        return (f"{identity['name']} ({identity['train_examples']:,} train, {identity['val_examples']:,} val, "
                f"{len(identity['classes'])} classes), digest `{identity['digest'][:12]}`")
    return f"{without_paths(str(manifest.get('dataset', 'not recorded')))}, digest not recorded"


# CIFAR-10's classes, in its batches.meta's order (the folders of a copy sort the same way)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def data_caveat(manifest: dict) -> str | None:
    """The sentence a result on CIFAR-10 read from image files needs (None for any other data): CIFAR-10 is
    distributed only as pickled pixel arrays, so a folder or shard copy of it is a re-encoding, and a lossy one (the
    JPEGs of shared/data/cifar10) moves every accuracy a little: such numbers are not CIFAR-10's published ones."""
    identity = manifest.get("data_identity") or {}
    if identity.get("format") not in ("folders", "shards") or identity.get("classes") != CIFAR10_CLASSES \
            or (identity.get("train_examples"), identity.get("val_examples")) != (50_000, 10_000):
        return None
    return ("These are CIFAR-10's images read from image files, not from its original python batches: a "
            "re-encoding (shared/data/cifar10's copy is JPEG, quality 75, 4:2:0), not the original pixels, so "
            "accuracies on it are not comparable with published CIFAR-10 figures.")


def data_caveats(manifests: Iterable[dict]) -> list[str]:
    """The distinct ``data_caveat`` sentences of several runs' data, sorted: what a page showing them all must say."""
    return sorted({caveat for manifest in manifests if (caveat := data_caveat(manifest))})


def paper_steps_text(x: float | None) -> str:
    """Paper(-equivalent) steps as the paper writes them (31.0e6); counts under 1e5 in full."""
    if x is None:
        return "—"
    return f"{x / 1e6:.1f}e6" if x >= 1e5 else f"{x:,.0f}"


def deviations_list(found: list[str] | None, what: str, indent: int = 0) -> str:
    """A run's recorded deviations from the paper, as Markdown: a count, then one indented bullet each."""
    if found is None:
        return "deviations from the paper: not recorded"
    head = f"deviations from the paper{f' ({what})' if what else ''}: " + ("none" if not found else f"{len(found)}")
    return "\n".join([head, *(f"{' ' * indent}- {text}" for text in found)])


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub markdown for ``df`` (``DataFrame.to_markdown`` needs tabulate, which is not a dependency)."""
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
