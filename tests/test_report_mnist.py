"""The MNIST report: what it says of BN's statistics."""

from __future__ import annotations

import pandas as pd

from bnrepro.report import mnist


def test_the_mnist_report_says_which_statistics_the_evaluations_between_used():
    steps = [0, 500, 1000, 1500]
    population = pd.DataFrame({"step": steps, "statistics": ["population"] * 4})
    moving = pd.DataFrame({"step": steps, "statistics": ["population", "moving", "moving", "population"]})
    assert mnist.between_text(population) == "population between"
    assert mnist.between_text(moving) == "moving between"
    assert "not recorded" in mnist.between_text(pd.DataFrame({"step": steps}))
