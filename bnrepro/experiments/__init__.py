"""Experiments: each wires recipes, data, models and the shared trainer into one of the paper's figures."""
