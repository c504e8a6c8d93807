"""Chapter 7's checkers accept the right answers and reject wrong ones with a useful sentence."""

import pytest
import torch

from lora_edu.checks import CheckFailed
from lora_edu.checks.ch07_serving_many_adapters import check_pool_bytes, check_ragged_delta, check_unpad_pool
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


def float64_output(x, A_rows, B_cols, starts, ranks, indices, scaling):
    """A learner's torch.zeros(..., dtype=torch.float64) meeting float32 products in a matmul."""
    out = torch.zeros(x.shape[0], B_cols.shape[0], dtype=torch.float64)
    for i in set(indices.tolist()) - {-1}:
        tokens = (indices == i).nonzero().flatten()
        own = slice(starts[i], starts[i] + ranks[i])
        out[tokens] = scaling[i] * (x[tokens].double() @ A_rows[own].T) @ B_cols[:, own].T
    return out


WRONG_RAGGED = {
    "reads r_max rows": (reads_r_max, "took its neighbour's rows"),
    "-1 is the last adapter": (minus_one_is_last, "got the last adapter"),
    "unscaled": (unscaled, "multiplied by its adapter's scaling"),
    "scaling by position": (scaled_by_position, "at its own position"),
    "starts off by one": (starts_off_by_one, r"tokens \[.*\] \(adapters .*\) get a different delta"),
    "summed over tokens": (lambda *args: right_ragged(*args).sum(0), "should have shape"),
    "float64 meets float32": (float64_output, "build the output with the inputs' dtype"),
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


# --- Exercise 7.3: a padded pool stored at each adapter's own rank ---

def right_unpad(A, B, ranks):
    if any(not 1 <= r <= A.shape[1] for r in ranks):
        raise ValueError(f"ranks must be between 1 and r_max={A.shape[1]}, got {ranks}")
    A_rows = torch.cat([A[i, :r] for i, r in enumerate(ranks)])
    B_cols = torch.cat([B[i, :, :r] for i, r in enumerate(ranks)], dim=1)
    return A_rows, B_cols, [sum(ranks[:i]) for i in range(len(ranks))]


def right_unpad_tensor_starts(A, B, ranks):
    """Also right: the starts as a tensor, the slices by a boolean mask."""
    if min(ranks) < 1 or max(ranks) > A.shape[1]:
        raise ValueError("rank out of range")
    keep = torch.arange(A.shape[1])[None, :] < torch.tensor(ranks)[:, None]  # (n, r_max)
    A_rows = A[keep]
    B_cols = B.transpose(1, 2)[keep].T
    starts = torch.cumsum(torch.tensor([0] + ranks[:-1]), 0)
    return A_rows, B_cols, starts


def keeps_padding(A, B, ranks):
    return A.reshape(-1, A.shape[2]), torch.cat(list(B), dim=1), [i * A.shape[1] for i in range(len(ranks))]


def b_by_rows(A, B, ranks):
    A_rows, _, starts = right_unpad(A, B, ranks)
    return A_rows, torch.cat([B[i, :, :r] for i, r in enumerate(ranks)], dim=1).T, starts


def starts_are_ends(A, B, ranks):
    A_rows, B_cols, starts = right_unpad(A, B, ranks)
    return A_rows, B_cols, [s + r for s, r in zip(starts, ranks)]


def padded_starts(A, B, ranks):
    A_rows, B_cols, _ = right_unpad(A, B, ranks)
    return A_rows, B_cols, [i * A.shape[1] for i in range(len(ranks))]


def last_ranks(A, B, ranks):
    _, _, starts = right_unpad(A, B, ranks)
    A_rows = torch.cat([A[i, A.shape[1] - r:] for i, r in enumerate(ranks)])
    B_cols = torch.cat([B[i, :, B.shape[2] - r:] for i, r in enumerate(ranks)], dim=1)
    return A_rows, B_cols, starts


def b_in_reverse(A, B, ranks):
    A_rows, _, starts = right_unpad(A, B, ranks)
    return A_rows, torch.cat([B[i, :, :r].flip(1) for i, r in enumerate(ranks)], dim=1), starts


def no_range_check(A, B, ranks):
    A_rows = torch.cat([A[i, :r] for i, r in enumerate(ranks)])
    B_cols = torch.cat([B[i, :, :r] for i, r in enumerate(ranks)], dim=1)
    return A_rows, B_cols, [sum(ranks[:i]) for i in range(len(ranks))]


def index_error_for_big_rank(A, B, ranks):
    if max(ranks) > A.shape[1]:
        raise IndexError("rank out of range")
    return right_unpad(A, B, ranks)


def zeroes_the_pool(A, B, ranks):
    result = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in right_unpad(A, B, ranks))
    A.zero_()
    return result


@pytest.mark.parametrize("right", [right_unpad, right_unpad_tensor_starts])
def test_unpad_pool_accepts(right, capsys):
    check_unpad_pool(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("fn, message", [
    (keeps_padding, "keeps r_max = .* rows for every adapter"),
    (b_by_rows, "Along which of B's dimensions"),
    (starts_are_ends, "where the adapters end"),
    (padded_starts, "where the slots begin in a padded pool"),
    (last_ranks, "take the last ranks of each slot"),
    (b_in_reverse, "exactly what its slot in the pool holds"),
    (no_range_check, "returned a result: it should raise ValueError"),
    (index_error_for_big_rank, "raised IndexError instead"),
    (zeroes_the_pool, "changed the pool it was given"),
    (lambda A, B, ranks: right_unpad(A, B, ranks)[:2], "three things"),
    (lambda A, B, ranks: (*right_unpad(A, B, ranks)[:2], None), "starts should be"),
    (stub, "still the stub"),
])
def test_unpad_pool_rejects(fn, message):
    with pytest.raises(CheckFailed, match=message):
        check_unpad_pool(fn)
