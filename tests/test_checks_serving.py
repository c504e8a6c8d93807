"""Chapter 7's checkers accept the right answers and reject wrong ones with a useful sentence."""

import pytest
import torch

from lora_edu.checks import CheckFailed
from lora_edu.checks.serving import check_pad_pool, check_pool_bytes, check_ragged_delta
from lora_edu.serving import gather_bmm


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 7.1: adapters of mixed ranks without padding ---

def right_ragged(x, A_rows, B_cols, starts, ranks, indices, scaling):
    out = x.new_zeros(x.shape[0], B_cols.shape[0])
    for i in set(indices.tolist()) - {-1}:  # one segment per adapter, at its own rank
        tokens = (indices == i).nonzero().flatten()
        a = A_rows[starts[i]:starts[i] + ranks[i]]
        b = B_cols[:, starts[i]:starts[i] + ranks[i]]
        out[tokens] = scaling[i] * (x[tokens] @ a.T) @ b.T
    return out


def right_by_padding_on_the_fly(x, A_rows, B_cols, starts, ranks, indices, scaling):
    """Also right (if wasteful): pad into a pool and use lora_edu's gathered kernel."""
    r_max = max(ranks)
    A = torch.zeros(len(ranks), r_max, x.shape[1], dtype=x.dtype)
    B = torch.zeros(len(ranks), B_cols.shape[0], r_max, dtype=x.dtype)
    for i, (start, r) in enumerate(zip(starts, ranks)):
        A[i, :r], B[i, :, :r] = A_rows[start:start + r], B_cols[:, start:start + r]
    return gather_bmm(x, A, B, indices, scaling)


def reads_r_max(x, A_rows, B_cols, starts, ranks, indices, scaling):
    r_max = max(ranks)
    out = x.new_zeros(x.shape[0], B_cols.shape[0])
    for t, i in enumerate(indices.tolist()):
        if i >= 0:
            out[t] = scaling[i] * B_cols[:, starts[i]:starts[i] + r_max] @ (A_rows[starts[i]:starts[i] + r_max] @ x[t])
    return out


def minus_one_is_last(x, A_rows, B_cols, starts, ranks, indices, scaling):
    return right_ragged(x, A_rows, B_cols, starts, ranks, indices % len(ranks), scaling)


def unscaled(x, A_rows, B_cols, starts, ranks, indices, scaling):
    return right_ragged(x, A_rows, B_cols, starts, ranks, indices, torch.ones_like(scaling))


def scaled_by_position(x, A_rows, B_cols, starts, ranks, indices, scaling):
    per_token = torch.cat([scaling, scaling.new_ones(len(indices))])[:len(indices), None]
    return unscaled(x, A_rows, B_cols, starts, ranks, indices, scaling) * per_token


def starts_off_by_one(x, A_rows, B_cols, starts, ranks, indices, scaling):
    padded_a = torch.cat([A_rows, A_rows.new_zeros(1, A_rows.shape[1])])
    padded_b = torch.cat([B_cols, B_cols.new_zeros(B_cols.shape[0], 1)], dim=1)
    return right_ragged(x, padded_a, padded_b, [s + 1 for s in starts], ranks, indices, scaling)


WRONG_RAGGED = {
    "reads r_max rows": (reads_r_max, "took its neighbour's rows"),
    "-1 is the last adapter": (minus_one_is_last, "got the last adapter"),
    "unscaled": (unscaled, "multiplied by its adapter's scaling"),
    "scaling by position": (scaled_by_position, "at its own position"),
    "starts off by one": (starts_off_by_one, r"tokens \[.*\] \(adapters .*\) get a different delta"),
    "summed over tokens": (lambda *args: right_ragged(*args).sum(0), "should have shape"),
}


@pytest.mark.parametrize("right", [right_ragged, right_by_padding_on_the_fly])
def test_ragged_delta_accepts(right, capsys):
    check_ragged_delta(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_RAGGED)
def test_ragged_delta_rejects(name):
    fn, message = WRONG_RAGGED[name]
    with pytest.raises(CheckFailed, match=message):
        check_ragged_delta(fn)


def test_ragged_delta_stub():
    with pytest.raises(CheckFailed, match="still the stub"):
        check_ragged_delta(stub)


# --- Exercise 7.2: the pool's memory, padded and not ---

def right_bytes(layer_shapes, ranks, r_max, bytes_per_number):
    per_rank = sum(out_f + in_f for out_f, in_f in layer_shapes) * bytes_per_number
    return len(ranks) * r_max * per_rank, sum(ranks) * per_rank


WRONG_BYTES = {
    "pads to the largest rank": (lambda shapes, ranks, r_max, b: right_bytes(shapes, ranks, max(ranks), b),
                                 "largest rank among these adapters"),
    "numbers, not bytes": (lambda shapes, ranks, r_max, b: right_bytes(shapes, ranks, r_max, 1), "not bytes"),
    "A only": (lambda shapes, ranks, r_max, b: right_bytes([(0, i) for _, i in shapes], ranks, r_max, b),
               r"counts A \(r x in\) but not B"),
    "dense update": (lambda shapes, ranks, r_max, b: tuple(
        v * 0 + sum(o * i for o, i in shapes) * n * b for v, n in zip(right_bytes(shapes, ranks, r_max, b),
                                                                       (len(ranks) * r_max, sum(ranks)))),
        "size of a dense update"),
    "first layer only": (lambda shapes, ranks, r_max, b: right_bytes(shapes[:1], ranks, r_max, b),
                         "first layer shape only"),
    "swapped": (lambda *args: right_bytes(*args)[::-1], "other way round"),
    "unpadded is padded": (lambda *args: (right_bytes(*args)[0],) * 2, "that is the padded total"),
    "not a pair": (lambda *args: right_bytes(*args)[0], "pair"),
    "off by one adapter": (lambda shapes, ranks, r_max, b: right_bytes(shapes, ranks + [1], r_max, b),
                           "times the right size"),
}


def test_pool_bytes_accepts(capsys):
    check_pool_bytes(right_bytes)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_BYTES)
def test_pool_bytes_rejects(name):
    fn, message = WRONG_BYTES[name]
    with pytest.raises(CheckFailed, match=message):
        check_pool_bytes(fn)


# --- Exercise 7.3: a pool of mixed ranks ---

def right_pad(adapters, r_max):
    if any(a.shape[0] > r_max for a, _ in adapters):
        raise ValueError("rank above r_max")
    d_in, d_out = adapters[0][0].shape[1], adapters[0][1].shape[0]
    A, B = torch.zeros(len(adapters), r_max, d_in), torch.zeros(len(adapters), d_out, r_max)
    for i, (a, b) in enumerate(adapters):
        A[i, : a.shape[0]], B[i, :, : b.shape[1]] = a, b
    return A, B


def padded_at_the_end_of_both(adapters, r_max):  # also right: the order of ranks inside a slot is free
    A, B = right_pad(adapters, r_max)
    return A.flip(1), B.flip(2)


def b_padded_on_rows(adapters, r_max):
    A, B = right_pad(adapters, r_max)
    for i, (a, b) in enumerate(adapters):
        r = a.shape[0]
        B[i] = 0
        B[i, :, :r] = torch.roll(b, 1, dims=0)  # the wrong side: rows shifted
    return A, B


def noisy_padding(adapters, r_max):
    A, B = right_pad(adapters, r_max)
    for i, (a, _) in enumerate(adapters):
        A[i, a.shape[0]:] = 1.0
        B[i, :, a.shape[0]:] = 1.0
    return A, B


def no_rank_check(adapters, r_max):
    return right_pad([(a[:r_max], b[:, :r_max]) for a, b in adapters], r_max)


@pytest.mark.parametrize("right", [right_pad, padded_at_the_end_of_both])
def test_pad_pool_accepts(right, capsys):
    check_pad_pool(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("fn, message", [
    (b_padded_on_rows, "pad columns"),
    (noisy_padding, "must be zeros"),
    (no_rank_check, "must raise ValueError"),
    (lambda adapters, r_max: right_pad(adapters, r_max)[0], "pair"),
    (lambda adapters, r_max: tuple(t[:, :2] for t in right_pad(adapters, r_max)), "should be"),
])
def test_pad_pool_rejects(fn, message):
    with pytest.raises(CheckFailed, match=message):
        check_pad_pool(fn)
