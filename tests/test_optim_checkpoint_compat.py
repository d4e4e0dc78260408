"""A checkpoint written by ``main`` before the batch-state refactor still loads, and training
continues on the trajectory the old code took (recorded in the fixture, float64)."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
from make_main_checkpoint import OPTIONS, STEPS_AFTER, Tiny, train  # noqa: E402

import loft  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "main_checkpoint.pt")


def test_main_checkpoint_loads_and_continues_on_the_old_trajectory():
    saved = torch.load(FIXTURE, weights_only=True)
    model = Tiny()
    model.load_state_dict(saved["model"])
    opt = loft.LoFTAdamW(model.param_groups(), **OPTIONS)
    opt.load_state_dict(saved["optimizer"])
    # options that were attributes then (or did not exist) are param-group keys now, filled in
    assert all("rebalance_threshold" not in g for g in saved["optimizer"]["param_groups"])
    assert [g["max_grad_norm"] for g in opt.param_groups] == [0.5] * 3
    assert [g["rebalance_threshold"] for g in opt.param_groups] == [10.0] * 3
    got = train(model, opt, STEPS_AFTER)
    moved = 0.0
    for step, (mine, old) in enumerate(zip(got, saved["continuation"])):
        for name, value in old.items():
            err = float((mine[name] - value).norm() / value.norm())
            assert err < 1e-12, (step, name, err)  # (bit-identical on the machine that wrote it)
        moved = max(moved, float((old["A.0"] - saved["model"]["A.0"]).norm()))
    assert moved > 1e-3  # the continuation really trains
    # and the state it writes is in the same per-parameter format as the one it read
    state = opt.state_dict()["state"]
    for pid, st in saved["optimizer"]["state"].items():
        assert state[pid].keys() == st.keys()
        for key, value in st.items():
            if torch.is_tensor(value):
                assert state[pid][key].shape == value.shape, (pid, key)
