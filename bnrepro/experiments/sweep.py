"""Beyond the paper: the learning-rate and initial-scale ranges BN opens, on the MNIST network of Fig. 1.

``bnrepro sweep`` trains a grid (learning rate x initial weight std x with and without BN x seeds) as one stack
(``experiments.mnist.run`` with a ``Grid``: every member its own rate and initial scale, in both engines). A
member that diverges is a result, recorded with its step. At the end, Sec. 3.3 is checked on one trained BN
network: scaling every hidden layer's weights by a leaves the output unchanged, BN(aWu) = BN(Wu), and scales
their gradients by 1/a.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from bnrepro.models.binary import BinaryBatch
from bnrepro.models.mlp import MLPStack

SCALES = (0.1, 10.0)  # Sec. 3.3's a
PROBE_EXAMPLES = 256  # test examples the check runs on


def log_grid(low: float, high: float, count: int) -> tuple[float, ...]:
    """``count`` values from ``low`` to ``high``, evenly spaced in log scale (rounded to 4 significant digits)."""
    if count == 1:
        return (float(low),)
    return tuple(float(f"{v:.4g}") for v in np.geomspace(low, high, count))


def summarize(metrics: pd.DataFrame, members: list, diverged_at: list[int | None], task) -> dict[str, Any]:
    """Per member: its final test accuracy (None once diverged) and divergence step; and Sec. 3.3's check."""
    last = metrics[metrics.step == metrics.step.max()].reset_index(drop=True)
    rows = []
    for i, (m, step) in enumerate(zip(members, diverged_at)):
        accuracy = float(last.loc[i, "test_accuracy"])
        rows.append({"variant": m.variant, "seed": m.seed, "lr": m.lr, "init_std": m.init_std,
                     "final_test_accuracy": None if math.isnan(accuracy) else accuracy, "diverged_at": step})
    return {"steps": int(metrics.step.max()), "members": rows,
            "divergences": [row for row in rows if row["diverged_at"] is not None],
            "scale_invariance": scale_invariance(task, members, [r["final_test_accuracy"] is not None and
                                                                 r["diverged_at"] is None for r in rows])}


@torch.no_grad()
def _member_copy(stack: MLPStack, member: int, eps: float) -> MLPStack:
    """Member ``member`` of ``stack`` alone, in float64, with BN epsilon ``eps``."""
    seed = 0
    one = MLPStack([seed], stack.widths, batch_norm=[member < stack.normalized], nonlinearity=stack.nonlinearity,
                   init="normal", init_std=1.0, bn_eps=eps, bn_momentum=stack.bn_momentum).double()
    one = one.to(stack.flat.device)  # beside the stack and the test data it is checked on (a GPU too)
    src, dst = stack.unflatten(stack.flat.detach().double()), one.unflatten(one.flat.data)
    w1, members, bn = stack.widths[1], stack.members, stack.normalized
    dst.weights[0].copy_(src.weights[0][:, member * w1:(member + 1) * w1])
    for a, b in zip(src.weights[1:], dst.weights[1:]):
        b.copy_(a[member])
    if member < bn:
        for a, b in zip((*src.gamma, *src.beta), (*dst.gamma, *dst.beta)):
            b.copy_(a.view(bn, -1)[member])
    else:
        for a, b in zip(src.bias, dst.bias):
            b.copy_(a.view(members - bn, -1)[member - bn])
    dst.bias_out.copy_(src.bias_out.view(members, -1)[member])
    return one


def scale_invariance(task, members: list, usable: list[bool]) -> dict[str, Any] | None:
    """Sec. 3.3 on one trained BN network (the BN member nearest the recipe's rate and initial std, seed 0,
    not diverged): its training-mode output and loss gradients on test examples with every hidden layer's W scaled by
    a, against a = 1: max |output_a - output_1| / max |output_1|, and max |a grad_a - grad_1| / max |grad_1| for
    the scaled weights; with BN's epsilon 0 (the identity exactly) and the recipe's."""
    stack, recipe = task.model, task.recipe
    candidates = [i for i, m in enumerate(members) if i < stack.normalized and m.seed == 0 and usable[i]]
    if not candidates:  # every BN member diverged: nothing trained to check
        return None

    def distance(i: int) -> float:
        m = members[i]
        return abs(math.log(m.lr / recipe.train.lr)) + abs(math.log(m.init_std / recipe.model.init_std))

    chosen = min(candidates, key=distance)
    x = BinaryBatch(task.test.bits[:PROBE_EXAMPLES].double())
    y = task.test_labels[:PROBE_EXAMPLES]
    found: dict[str, Any] = {"member": {"variant": members[chosen].variant, "seed": members[chosen].seed,
                                        "lr": members[chosen].lr, "init_std": members[chosen].init_std}}
    for eps_name, eps in (("eps_0", 0.0), ("eps_recipe", recipe.model.bn_eps)):
        outputs, grads = {}, {}
        for a in (1.0, *SCALES):
            one = _member_copy(stack, chosen, eps)
            params = one.unflatten(one.flat.data)
            for weight in params.weights[:-1]:  # every layer followed by BN
                weight.mul_(a)
            with torch.enable_grad():
                loss = one.losses(x, y).sum()
                (grad,) = torch.autograd.grad(loss, one.flat)
            logits, _, _ = one.forward_pass(one.unflatten(one.flat.detach()), x, train=True)
            outputs[a], grads[a] = logits, [g.clone() for g in one.unflatten(grad).weights[:-1]]
        found[eps_name] = {
            f"a={a:g}": {
                "output": float((outputs[a] - outputs[1.0]).abs().max() / outputs[1.0].abs().max()),
                "gradient_times_a": max(float((a * ga - g1).abs().max() / g1.abs().max())
                                        for ga, g1 in zip(grads[a], grads[1.0])),
            } for a in SCALES}
    return found
