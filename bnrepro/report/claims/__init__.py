"""The claims of Sec. 4.2, one table per profile, judged twice: by rules v2 (``v2``) and by rules v1 (``v1``).

Each claim has the paper's figure, this scale's figure and a verdict. v1 was written before any run at profile
``cpu`` existed; v2 after a review of the first campaign, before the next one's runs existed. v1 is kept unchanged in
behaviour and printed beside v2, so a reader sees what changed and why; claims.md prints both rule sets word for word.

The runs are the rows of imagenet.md (``selection.select``: at each profile only the runs on its chosen data, then
``selection.latest_per_recipe``: per recipe and overrides, the latest finished run of the lowest seed, with the latest
run of each other seed in ``others``; v1 judges the row's run, v2 all its seeds) and, for the last claim, the latest
ensemble run at the profile on the same data (``ensemble.select``), its per-image correctness recomputed from its
cached probabilities (``ensemble.top1_correct``). The target: v1's is the best top-1 of Inception's lowest seed
(``v1.target``); v2's T, the mean over Inception's seeds of their max, is ``selection.target_for``, which imagenet.md
and its Fig. 2 show as well.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bnrepro.report.claims import v1, v2
from bnrepro.report.claims.common import CLAIMS, Verdict
from bnrepro.report.selection import Run, data_name, latest_per_recipe, profile_rank, select
from bnrepro.report.text import data_caveats, markdown_table
from bnrepro.runs import atomic_write, check_writable


def claims_table(new: list[Verdict], old: list[Verdict]) -> pd.DataFrame:
    """The claims with v2's figure and both verdicts, side by side."""
    before = {v.number: v.verdict for v in old}
    return pd.DataFrame([{"#": v.number, "Claim (Sec. 4.2)": CLAIMS[v.number][0], "Paper": CLAIMS[v.number][1],
                          "This scale (v2)": v.ours, "v2 verdict": v.verdict, "v1 verdict": before.get(v.number, "—")}
                         for v in new])


def v1_table(old: list[Verdict]) -> pd.DataFrame:
    """v1's own figures, for a reader who wants to see what its verdicts rested on."""
    return pd.DataFrame([{"#": v.number, "This scale (v1)": v.ours, "v1 verdict": v.verdict} for v in old])


def _rules_text() -> list[str]:
    """Both rule sets, v2 first, word for word."""
    return ["## Rules v2", "",
            "Written after a review of v1 on the first campaign and before the next campaign's runs existed, from "
            "first principles (no number of any run chose them). What changed, and why:", "",
            *(f"- {text}" for text in v2.CHANGES), "",
            "The rules:", "",
            *(f"- {text}" for text in v2.COMMON), "",
            *(f"{n}. {CLAIMS[n][0]}: {v2.RULES[n]}" for n in sorted(v2.RULES)), "",
            "## Rules v1", "",
            "Registered before the first campaign's runs existed; kept unchanged so that their verdicts stand beside "
            "v2's. Verdicts `held`, `not held`, `within seed spread` or `not run`.", "",
            *(f"- {text}" for text in v1.COMMON), "",
            *(f"{n}. {CLAIMS[n][0]}: {v1.RULES[n]}" for n in sorted(v1.RULES)), ""]


def _left_out(profile: str, other: list[Run]) -> list[str]:
    """The sentence saying how many of the profile's runs are on other data, so not judged; [] where none is."""
    here = [r for r in other if r.profile == profile]
    if not here:
        return []
    names = "; ".join(sorted({data_name(r.manifest) or "not recorded" for r in here}))
    runs = f"{len(here)} finished run{'s' * (len(here) > 1)} at this profile on other data ({names})"
    return [f"{runs}: not judged, as imagenet.md leaves {'them' if len(here) > 1 else 'it'} out.", ""]


def markdown(by_profile: dict[str, dict[str, Run]], results: Path, other: list[Run] = ()) -> str:
    """claims.md: both rule sets, then each profile's claims on the runs of imagenet.md (``by_profile``), saying how
    many runs on other data (``other``) are left out."""
    lines = ["# Claims of Sec. 4.2, judged at each profile", "",
             "Each claim of the paper's Sec. 4.2 with the paper's figure, this scale's and two verdicts: by rules v2, "
             "`held`, `not held`, `inconclusive` (the difference lies within the noise band), `not testable at this "
             "scale` (the runs cannot exercise the claim) or `not run`; and by rules v1, those of the first campaign. "
             "Both rule sets are fixed in `bnrepro/report/claims/` (`v1.py`, `v2.py`) and applied as written below. "
             "imagenet.md now "
             "shows v2's target T, the mean over Inception's seeds of their max; where the rules, written before, "
             "call imagenet.md's target the best top-1 of Inception's (lowest seed's) run, that is v1's target, which "
             "v1 keeps. The runs are those "
             "of imagenet.md's section of the same profile, all their seeds for v2, on the one data set it shows "
             "there; claim 7's is the latest ensemble run at the profile on that data, as in ensemble.md.", "",
             *_rules_text()]
    for profile in sorted({*by_profile, *(r.profile for r in other)}, key=profile_rank):
        lines += [f"## Profile `{profile}`", "", *_left_out(profile, list(other))]
        if profile not in by_profile:
            lines += ["No finished run on this profile's chosen data yet, so no claim is judged here.", ""]
            continue
        rows = by_profile[profile]
        caveats = data_caveats(r.manifest for row in rows.values() for r in row.seeds)
        lines += [*caveats, ""] if caveats else []
        new, target = v2.judge(profile, rows, results)
        old, spread = v1.judge(profile, rows, results)
        lines += [f"v2's target T: {target}.", "", f"v1's seed spread: {spread}", "",
                  markdown_table(claims_table(new, old)), "", "v1's figures:", "", markdown_table(v1_table(old)), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def build(results: Path, out: Path) -> list[Path]:
    """Write claims.md for every profile with finished ImageNet runs; [] when there are none."""
    runs, other = select(Path(results))
    if not runs and not other:
        return []
    check_writable(out)
    atomic_write(out / "claims.md", markdown(latest_per_recipe(runs), Path(results), other))
    return [out / "claims.md"]
