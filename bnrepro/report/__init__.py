"""Figures and tables, regenerated from the run folders alone (nothing is recomputed)."""

from __future__ import annotations

from pathlib import Path

from bnrepro.errors import UserError


def build(results: Path, out: Path) -> list[Path]:
    """Write every figure and table the runs under ``results`` support; returns the files written."""
    from bnrepro.report import changes, claims, ensemble, imagenet, mnist, sweep

    results = Path(results)
    if not results.is_dir():
        raise UserError(f"no results folder at {results}; run an experiment first or pass --results")
    written = mnist.build(results, Path(out)) + imagenet.build(results, Path(out)) + ensemble.build(results, Path(out))
    written += claims.build(results, Path(out))  # Sec. 4.2's claims, from the same ImageNet and ensemble runs
    written += changes.build(results, Path(out))  # beyond the paper: the changes study (--study changes)
    written += sweep.build(results, Path(out))
    if not written:
        raise UserError(f"no complete runs under {results}; run `bnrepro mnist` or `bnrepro imagenet` first "
                        f"(then `bnrepro ensemble` on finished imagenet runs)")
    return written


def save_figure(fig, out: Path, name: str) -> list[Path]:
    """Write ``fig`` as ``out/name.png`` and ``.svg``, each through a temporary file so no reader sees half a
    figure; closes the figure. The same runs give the same bytes: the SVG carries no date, and its element ids
    are salted with the name rather than at random."""
    import matplotlib
    import matplotlib.pyplot as plt

    written = []
    for suffix in ("png", "svg"):
        path, tmp = out / f"{name}.{suffix}", out / f".{name}.tmp.{suffix}"
        with matplotlib.rc_context({"svg.hashsalt": name}):
            fig.savefig(tmp, dpi=150, metadata={"Date": None} if suffix == "svg" else None)
        tmp.replace(path)
        written.append(path)
    plt.close(fig)
    return written
