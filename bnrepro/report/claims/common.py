"""What both rule sets of the claims share: the claims and the paper's figure for each (from paper.yaml), the
verdict record, the paper's numbers the rules print, and the ensemble run claim 7 reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bnrepro.paper import PAPER
from bnrepro.report import ensemble
from bnrepro.report.selection import Run, row_key
from bnrepro.report.text import paper_steps_text

HELD, NOT_HELD, NOT_RUN = "held", "not held", "not run"

# The paper's numbers and the runs the claims compare come from bnrepro/paper.yaml; the rules below print them.
SHARDS = PAPER.variants["shards-only"]
SHARDS_ONLY = row_key(SHARDS.stem, tuple(sorted(SHARDS.overrides)))  # BN-x5 without change 6
HALF_PAPER_SPEEDUP = PAPER.imagenet.speedup_in_text / 2  # 7: half the text's "14 times" (31.0e6 / 2.1e6 = 14.8x)
TARGET_TEXT = f"{100 * PAPER.imagenet.target:.1f}%"  # 72.2%, as the rules print it
SPEEDUP_TEXT = f"{PAPER.speedup('bn-x5'):.1f}x"  # BN-x5's 14.8x of Fig. 3


def fig3_steps(name: str) -> str:
    return paper_steps_text(PAPER.fig3(name).steps)


def _fig3_max(name: str) -> str:
    return f"{100 * PAPER.fig3(name).max_top1:.1f}%"


def _fig4_top1(model: str) -> str:
    return f"{PAPER.ensemble.fig4_row(model).top1_error:g}%"


def paper_claims() -> dict[int, tuple[str, str]]:
    """Each claim of Sec. 4.2 and the paper's figure for it, the numbers from paper.yaml."""
    models = PAPER.ensemble.fig4_row("BN-Inception ensemble").models
    return {
        1: ("BN-Baseline reaches Inception's maximum accuracy in fewer steps",
            f"{fig3_steps('bn-baseline')} vs {fig3_steps('inception')} steps to {TARGET_TEXT} "
            f"({PAPER.speedup('bn-baseline'):.1f}x)"),
        2: (f"BN-x5 reaches it in about {PAPER.imagenet.speedup_in_text:g} times fewer steps than Inception",
            f"{fig3_steps('bn-x5')} steps, {SPEEDUP_TEXT} fewer"),
        3: ("BN-x30 starts slower than BN-x5 but ends higher",
            f"{fig3_steps('bn-x30')} vs {fig3_steps('bn-x5')} steps to {TARGET_TEXT}; max {_fig3_max('bn-x30')} "
            f"vs {_fig3_max('bn-x5')}"),
        4: ("Inception at 5x the learning rate (0.0075) diverges",
            "parameters reach \"machine infinity\""),
        5: ("Inception-Sigmoid never leaves chance; BN-x5-Sigmoid trains",
            f"Inception-Sigmoid never above chance (1/{PAPER.imagenet.classes}); BN-x5-Sigmoid "
            f"{_fig3_max('bn-x5-sigmoid')}"),
        6: (f"Within-shard shuffling (change 6) adds about {PAPER.imagenet.change_6_gain:.0%} accuracy",
            f"about {PAPER.imagenet.change_6_gain:+.0%}"),
        7: (f"Multicrop lowers the error; the {models}-model ensemble lowers it further",
            f"top-1 error {_fig4_top1('BN-Inception single crop')} (1 crop), {_fig4_top1('BN-Inception multicrop')} "
            f"(144 crops), {_fig4_top1('BN-Inception ensemble')} ({models}-model ensemble, 144 crops)"),
    }


CLAIMS = paper_claims()


@dataclass
class Verdict:
    number: int
    ours: str  # this scale's figure
    verdict: str



def missing_runs(rows: dict[str, Run], *keys: str) -> Verdict | None:
    """None when every row is there, else the not-run ``Verdict`` (number filled in by the caller)."""
    absent = [k for k in keys if k not in rows]
    return Verdict(0, "no finished run of " + ", ".join(f"`{k}`" for k in absent), NOT_RUN) if absent else None


def ensemble_at(results: Path, profile: str) -> ensemble.EnsembleRun | None:
    """The latest finished ensemble run whose members were trained at ``profile``, on the data imagenet.md shows
    there (``ensemble.select``, as ensemble.md)."""
    found = [run for run in ensemble.select(Path(results))[0] if run.profile == profile]
    return found[-1] if found else None



def ensemble_for_claim_7(results: Path, profile: str) -> ensemble.EnsembleRun | Verdict:
    """The latest ensemble run at ``profile`` if it can judge claim 7 (two or more members, 1 and 144 crops),
    else the ``not run`` verdict saying why: both rule sets start from it."""
    run = ensemble_at(results, profile)
    if run is None:
        return Verdict(7, f"no finished ensemble run at profile `{profile}`", NOT_RUN)
    if len(run.members) < 2 or not {1, 144} <= set(run.crops):
        return Verdict(7, f"`{run.rel}` has {len(run.members)} member(s) and crops "
                          f"{'/'.join(map(str, run.crops))}: no ensemble at 1 and 144 crops", NOT_RUN)
    return run
