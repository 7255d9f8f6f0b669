"""``python -m bnrepro`` (what ``torchrun -m bnrepro imagenet ...`` starts in every process)."""

from bnrepro.cli import run

run()
