"""Chapter 7's checkers accept the right answers and reject wrong ones with a useful sentence."""

import pytest
import torch

from lora_edu.checks import CheckFailed
from lora_edu.checks.serving import check_bgmv, check_pad_pool, check_segments
from lora_edu.serving import bgmv, lora_loop, segments, sgmv


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 7.1: BGMV ---

def naive_gather(x, A, B, indices, scaling):  # A[-1] is the last adapter: vLLM's old torch reference
    shrink = torch.einsum("b...i,bri->b...r", x, A[indices])
    return torch.einsum("b...r,bor->b...o", shrink, B[indices]) * scaling[indices].view(-1, *[1] * (x.dim() - 1))


WRONG_BGMV = {
    "-1 is the last adapter": (naive_gather, "got the last adapter"),
    "unscaled": (lambda x, A, B, i, s: lora_loop(x, A, B, i, torch.ones_like(s)), "not scaled"),
    "scaling by position": (lambda x, A, B, i, s: lora_loop(x, A, B, i, torch.ones_like(s))
                            * s[: len(i)].view(-1, *[1] * (x.dim() - 1)), "not scaling\\[row\\]"),
    "off by a factor": (lambda x, A, B, i, s: lora_loop(x, A, B, i, s) * 1.5, "is off by"),
    "summed over rows": (lambda x, A, B, i, s: lora_loop(x, A, B, i, s).sum(0), "should have shape"),
}


@pytest.mark.parametrize("right", [bgmv, sgmv, lora_loop])
def test_bgmv_accepts(right, capsys):
    check_bgmv(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_BGMV)
def test_bgmv_rejects(name):
    fn, message = WRONG_BGMV[name]
    with pytest.raises(CheckFailed, match=message):
        check_bgmv(fn)


def test_bgmv_stub():
    with pytest.raises(CheckFailed, match="still the stub"):
        check_bgmv(stub)


# --- Exercise 7.2: segments ---

def unsorted_segments(indices):  # unique_consecutive on rows that were never sorted
    adapters, counts = torch.unique_consecutive(indices, return_counts=True)
    return torch.arange(len(indices)), adapters.tolist(), counts.tolist()


def right_by_dict(indices):  # also right: group in order of first appearance
    groups = {}
    for row, adapter in enumerate(indices.tolist()):
        groups.setdefault(adapter, []).append(row)
    order = torch.tensor([row for rows in groups.values() for row in rows])
    return order, list(groups), [len(rows) for rows in groups.values()]


WRONG_SEGMENTS = {
    "not sorted first": (unsorted_segments, "more than one segment"),
    "order loses a row": (lambda i: (segments(i)[0][:-1], *segments(i)[1:]), "every row exactly once"),
    "counts off": (lambda i: (segments(i)[0], segments(i)[1], [c + 1 for c in segments(i)[2]]), "adding up"),
    "sorted adapters, unsorted rows": (lambda i: (torch.arange(len(i)), *segments(i)[1:]), "which use adapters"),
    "not a triple": (lambda i: segments(i)[:2], "triple"),
}


@pytest.mark.parametrize("right", [segments, right_by_dict])
def test_segments_accepts(right, capsys):
    check_segments(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_SEGMENTS)
def test_segments_rejects(name):
    fn, message = WRONG_SEGMENTS[name]
    with pytest.raises(CheckFailed, match=message):
        check_segments(fn)


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
