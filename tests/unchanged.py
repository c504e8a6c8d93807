"""What a refusal must leave as it was: every tensor, every requires_grad flag, every module type."""

import torch


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m).__name__, m.training) for n, m in model.named_modules()])


def same(a, b):
    """Equal to the bit, NaN where the other has NaN (a NaN put there by the test stays)."""
    if a.is_floating_point():
        return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    return torch.equal(a, b)


def assert_unchanged(model, before):
    tensors, flags, modules = snapshot(model)
    assert modules == before[2], "the modules (or their train/eval modes) changed"
    assert flags == before[1], "requires_grad changed"
    assert tensors.keys() == before[0].keys()
    changed = [k for k in tensors if not same(tensors[k], before[0][k])]
    assert not changed, f"tensors changed: {changed[:3]}"
