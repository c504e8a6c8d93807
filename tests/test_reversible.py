"""Tests of lora_edu.reversible (MEFT): reversible backward gives ordinary backprop's gradients
with a constant number of saved bytes, rebuilds activations within rounding, and refuses bad
input leaving the model as it was."""

import copy
import statistics

import pytest
import torch

from lora_edu.gpt2 import GPT2, Block, GPT2Config
from lora_edu.lora import add_lora
from lora_edu.memory import saved_activation_bytes
from lora_edu.reversible import (VARIANTS, Adapter, MEFTGPT2, ReversibleLayer, add_meft, reconstruction_errors,
                                 reversible_stack)
from unchanged import assert_unchanged, snapshot


def small_gpt2(n_layer=3, dropout=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, block_size=64, dropout=dropout)
    return GPT2(config).to(dtype)


def with_random_adapters(model, std=0.1, seed=1):
    """Adapters start small (std 0.02); make them larger so every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapters():
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=g) * std)
    return model


def gradients(model, idx, targets, reversible, seed=7):
    model.train()
    model.reversible = reversible
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks for both runs
    _, loss = model(idx, targets)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def batch(vocab=256, length=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, length), generator=g), torch.randint(0, vocab, (2, length), generator=g)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reversible_backward_equals_ordinary_backprop_of_the_same_network(variant, dropout):
    model = with_random_adapters(add_meft(small_gpt2(dropout=dropout), variant, bottleneck=4))
    idx, targets = batch()
    plain_loss, plain = gradients(model, idx, targets, reversible=False)
    rev_loss, rev = gradients(model, idx, targets, reversible=True)
    assert rev_loss == plain_loss
    assert plain.keys() == rev.keys() and len(plain) == 4 * 3 * 2  # two adapters a layer, 4 tensors each
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(rev[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


def test_dropout_is_replayed_not_redrawn():
    """With dropout, a backward that drew new masks would give other gradients: it must not."""
    model = with_random_adapters(add_meft(small_gpt2(dropout=0.3), "meft3", bottleneck=4))
    idx, targets = batch()
    _, first = gradients(model, idx, targets, reversible=True, seed=7)
    _, other_masks = gradients(model, idx, targets, reversible=False, seed=8)
    _, same_masks = gradients(model, idx, targets, reversible=False, seed=7)
    name = next(iter(first))
    assert not torch.allclose(other_masks[name], same_masks[name])
    torch.testing.assert_close(first[name], same_masks[name], rtol=1e-9, atol=1e-12)


def test_gradcheck_in_float64():
    model = with_random_adapters(add_meft(small_gpt2(n_layer=2), "meft3", bottleneck=2), std=0.3)
    model.train()
    params = [p for p in model.layers.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(1, 4, 32, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b, *p: reversible_stack(a, b, model.layers), (x1, x2, *params))


def test_saved_bytes_do_not_grow_with_depth_and_are_far_below_lora():
    idx, targets = batch(length=64)
    saved = {}
    for n_layer in (4, 16):
        model = add_meft(small_gpt2(n_layer=n_layer, dtype=torch.float32), "meft1")
        saved[n_layer] = saved_activation_bytes(model, idx, targets)
    assert saved[4] == saved[16]  # the top output and the head: nothing per layer
    lora = small_gpt2(n_layer=4, dtype=torch.float32)
    add_lora(lora, r=8)
    assert saved[4] < 0.2 * saved_activation_bytes(lora, idx, targets)
    # the same network through ordinary autograd stores every layer's activations
    model.reversible = False
    assert saved_activation_bytes(model, idx, targets) > 3 * saved[16]


def test_the_top_layer_is_rebuilt_within_the_rounding_of_one_coupling():
    """x2 = (y2 - G(y1)) / beta: y2 was rounded once when it was made and once in the
    subtraction, so |x2 error| <= 2 eps (|y2| + |G(y1)|) / |beta|, G(y1) being recomputed
    exactly from the stored y1."""
    for dtype, eps in ((torch.float32, 2.0 ** -24), (torch.bfloat16, 2.0 ** -8)):
        model = add_meft(small_gpt2(dtype=dtype), "meft2", beta=0.1)
        with_random_adapters(model).eval()
        with torch.no_grad():
            x1 = x2 = model.base.embed(batch()[0])
            top = model.layers[-1]
            for layer in model.layers[:-1]:
                x1, x2 = layer(x1, x2)
            out1, out2 = top(x1, x2)
            y1, y2 = out2, out1  # meft2 hands its outputs on swapped
            bound = 2 * eps * (y2.abs().max() + top.g(y1).abs().max()) / 0.1
            error = (top.inverse(out1, out2)[1] - x2).abs().max()
        assert 0 <= error <= bound, (dtype, error, bound)


def test_rebuilding_errors_grow_downwards_and_with_a_coarser_dtype():
    idx = batch()[0]
    errors = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        model = with_random_adapters(add_meft(small_gpt2(n_layer=4, dtype=dtype), "meft1"))
        errors[dtype] = reconstruction_errors(model, idx)
    assert errors[torch.float32][0] > errors[torch.float32][-1]  # the bottom layer is rebuilt last
    assert max(errors[torch.float64]) < 1e-9 < max(errors[torch.float32])
    assert max(errors[torch.bfloat16]) > 100 * max(errors[torch.float32])


def test_meft1_carries_the_pretrained_hidden_states_of_two_consecutive_layers():
    """With zero adapters and lambda -> 0, MEFT1's streams leave layer n holding the base
    model's hidden states after layers n-1 and n: the output averages the last two."""
    base = small_gpt2(n_layer=3)
    model = add_meft(copy.deepcopy(base), "meft1", lam=1e-9).eval()
    with torch.no_grad():
        for adapter in model.adapters():
            adapter.up.weight.zero_()
    idx = batch()[0]
    with torch.no_grad():
        hidden = [base.embed(idx)]
        for block in base.transformer.h:
            hidden.append(block(hidden[-1]))
        x1, x2 = model.streams(hidden[0])
    torch.testing.assert_close(x1, hidden[-2], rtol=0, atol=1e-7)
    torch.testing.assert_close(x2, hidden[-1], rtol=0, atol=1e-7)


def test_the_base_is_frozen_and_only_the_adapters_train():
    model = add_meft(small_gpt2(), "meft1", bottleneck=4)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".adapter." in n or n.endswith(("g.down.weight", "g.down.bias", "g.up.weight", "g.up.bias"))
                           for n in trained)
    assert not any(p.requires_grad for p in model.base.parameters())
    assert all(isinstance(layer, ReversibleLayer) for layer in model.layers)
    assert len(model.adapters()) == 6 and all(isinstance(a, Adapter) for a in model.adapters())
    for adapter in model.adapters():  # the paper's initialisation: N(0, 0.02^2), biases zero
        for layer in (adapter.down, adapter.up):
            assert abs(layer.weight.std().item() - 0.02) < 0.006 and layer.bias.abs().max() == 0
    base = small_gpt2()
    torch.manual_seed(123)  # the adapters come from seed, not from the global generator
    again = add_meft(base, "meft1", bottleneck=4)
    assert torch.equal(again.adapters()[0].down.weight, model.adapters()[0].down.weight)
    assert not torch.equal(add_meft(small_gpt2(), "meft1", bottleneck=4, seed=1).adapters()[0].down.weight,
                           model.adapters()[0].down.weight)


def test_eval_runs_without_the_reversible_function_and_gives_the_same_logits():
    model = with_random_adapters(add_meft(small_gpt2(), "meft3"))
    idx = batch()[0]
    model.train()
    with torch.no_grad():
        no_grad = model(idx)
    train_logits = model(idx)
    model.eval()
    torch.testing.assert_close(model(idx), no_grad)
    torch.testing.assert_close(train_logits.detach(), no_grad)


def test_the_scales_default_to_the_variants():
    for variant, (_, _, lam, beta, swap) in VARIANTS.items():
        layer = add_meft(small_gpt2(n_layer=1), variant).layers[0]
        assert (layer.lam, layer.beta, layer.swap) == (lam, beta, swap)
    assert add_meft(small_gpt2(n_layer=1), "meft1", lam=0.5).layers[0].lam == 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"lam": 0}, "lam must be a finite non-zero number"),
    ({"lam": float("nan")}, "lam must be"),
    ({"beta": float("inf")}, "beta must be a finite non-zero number"),
    ({"beta": True}, "beta must be"),
    ({"variant": "meft4"}, "variant must be one of"),
    ({"bottleneck": 0}, "bottleneck must be a positive int"),
    ({"seed": 1.5}, "seed must be an int"),
    ({"variant": ["meft1"]}, "variant must be one of"),
])
def test_bad_options_are_refused_and_the_model_is_left_unchanged(kwargs, message):
    model = small_gpt2()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        add_meft(model, **kwargs)
    assert_unchanged(model, before)


def test_models_whose_blocks_it_does_not_know_are_refused():
    class OtherBlock(Block):
        pass

    model = small_gpt2()
    model.transformer.h[1].__class__ = OtherBlock
    before = snapshot(model)
    with pytest.raises(TypeError, match="block 1 is OtherBlock"):
        add_meft(model)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="model must be a lora_edu GPT2"):
        add_meft(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="model must be a lora_edu GPT2"):
        add_meft(add_meft(small_gpt2()))


def test_a_model_with_lora_is_refused_unchanged():
    model = small_gpt2()
    add_lora(model, r=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has fine-tuning layers: LoRA"):
        add_meft(model)
    assert_unchanged(model, before)


def test_reconstruction_errors_wants_a_meft_model():
    with pytest.raises(TypeError, match="MEFTGPT2"):
        reconstruction_errors(small_gpt2(), batch()[0])
    assert isinstance(add_meft(small_gpt2()), MEFTGPT2)


def test_backward_recomputes_under_the_autocast_of_the_forward_pass():
    """Under bfloat16 autocast, F and G must be recomputed in bfloat16 too: recomputed in
    float32 they differ from forward's by bfloat16's rounding, and the rebuilt inputs by
    that over lambda (the gradients then come out wrong by more than their own size)."""
    model = with_random_adapters(add_meft(small_gpt2(dtype=torch.float32), "meft1", bottleneck=4))
    idx, targets = batch()

    def grads(reversible):
        model.train()
        model.reversible = reversible
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for plain, rev in zip(grads(False), grads(True)):
        assert (rev - plain).abs().max() <= 2e-2 * plain.abs().max()


def test_two_forward_passes_before_one_backward_each_replay_their_own_dropout():
    model = with_random_adapters(add_meft(small_gpt2(dropout=0.3), "meft3", bottleneck=4))
    a, b = batch(seed=3)[0], batch(seed=4)[0]

    def grads(reversible):
        model.train()
        model.reversible = reversible
        model.zero_grad()
        torch.manual_seed(7)
        (model(a).square().mean() + model(b).square().mean()).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for rev, plain in zip(grads(True), grads(False)):
        torch.testing.assert_close(rev, plain, rtol=1e-9, atol=1e-12)


def test_rebuilding_errors_grow_far_faster_than_one_over_lambda_when_both_scales_are_small():
    """F and G carry the residual identity: MEFT3 (lambda = beta = 0.1) loses about a factor
    of 100 a layer, so in float32 a dozen layers rebuild nothing useful, while MEFT1 over
    three layers stays close."""
    idx = batch()[0]
    deep = add_meft(small_gpt2(n_layer=12, dtype=torch.float32), "meft3")
    shallow = add_meft(small_gpt2(n_layer=3, dtype=torch.float32), "meft1")
    deep_errors, shallow_errors = reconstruction_errors(deep, idx), reconstruction_errors(shallow, idx)
    assert deep_errors[0] > 1 > 1e-3 > max(shallow_errors)
    growth = [below / above for below, above in zip(deep_errors[:-1], deep_errors[1:])]
    assert statistics.median(growth) > 20  # far more than 1 / lambda = 10 a layer


def test_reconstruction_errors_refuses_bad_input_and_leaves_the_mode():
    model = add_meft(small_gpt2(), "meft1").train()
    with pytest.raises(ValueError, match="idx must have shape"):
        reconstruction_errors(model, torch.zeros(4, dtype=torch.long))
    assert model.training


def test_a_reversible_layer_refuses_a_scale_it_would_divide_by():
    model = add_meft(small_gpt2(n_layer=1), "meft1")
    layer = model.layers[0]
    with pytest.raises(ValueError, match="beta must be a finite non-zero number"):
        ReversibleLayer(layer.f, layer.g, 0.1, 0.0, True)


def test_the_wrapper_starts_in_the_base_models_mode():
    assert not add_meft(small_gpt2().eval(), "meft1").training
    assert add_meft(small_gpt2().train(), "meft1").training
