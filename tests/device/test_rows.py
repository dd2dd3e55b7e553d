"""Row planning: which positions leave the device, and where each sample's label reads."""

import pytest
import torch

from mobillm.data import IGNORE_INDEX, Batch
from mobillm.device.rows import plan_rows


def _cls_batch():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    return Batch(ids, mask, labels=torch.tensor([1, 0]), loss_positions=torch.tensor([2, 1]))


def test_classification_rows():
    b = _cls_batch()
    loss = plan_rows(b, "loss")
    assert loss.index.tolist() == [2, 5] and loss.pool_rows.tolist() == [0, 1]
    valid = plan_rows(b, "valid")
    assert valid.index.tolist() == [0, 1, 2, 4, 5]
    assert valid.rows_per_sample.tolist() == [3, 2] and valid.pool_rows.tolist() == [2, 4]
    every = plan_rows(b, "all")
    assert every.num_rows == 8 and every.pool_rows.tolist() == [2, 5]
    hidden = torch.arange(8 * 3, dtype=torch.float32).reshape(2, 4, 3)
    assert loss.gather(hidden).tolist() == [hidden[0, 2].tolist(), hidden[1, 1].tolist()]


def test_causal_lm_rows():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = (ids != 0).long()
    t = torch.full_like(ids, IGNORE_INDEX)
    t[0, 1:3] = ids[0, 2:4]  # response = tokens 2..3
    t[1, 1] = ids[1, 2]
    plan = plan_rows(Batch(ids, mask, targets=t), "loss")
    assert plan.index.tolist() == [1, 2, 5]
    assert plan.targets.tolist() == [7, 8, 11]
    assert plan.rows_per_sample.tolist() == [2, 1]
    assert all(0 <= r < plan.num_rows for r in plan.pool_rows.tolist())
    valid = plan_rows(Batch(ids, mask, targets=t), "valid")
    ig = IGNORE_INDEX
    assert valid.targets.tolist() == [ig, 7, 8, ig, ig, 11, ig]


def test_unknown_positions():
    with pytest.raises(ValueError, match="positions"):
        plan_rows(_cls_batch(), "some")
