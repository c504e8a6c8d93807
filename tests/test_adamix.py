"""AdaMix: copies of LoRA's A beside a shared B, a random copy per layer per training pass, a
consistency loss between two passes, and a merge that averages the copies into one LoRA adapter."""

import copy

import pytest
import torch
import torch.nn as nn

from lora_edu.lora import count_parameters, lora_layers, merge_lora
from lora_edu.lora_layer import LoRALinear
from lora_edu.peft_family import AdaMixLinear, adamix_layers, add_adamix, add_vera, merge_adamix, merge_peft
from lora_edu.train import TrainConfig, symmetric_kl, train

IDX = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base():
    from lora_edu.gpt2 import load_tiny

    return load_tiny().eval()


def randomize(model, std=0.05, seed=1):
    """Random copies and B, so that routes differ (a fresh AdaMix has B = 0 and equal copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adamix_layers(model).values():
            for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def integer_layer(share_b, copies=4, r=2, width=6, seed=0):
    """An AdaMix layer whose weights and input are small integers: every sum below is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    layer = AdaMixLinear(nn.Linear(width, width), r=r, alpha=r, copies=copies, share_b=share_b)  # scaling 1
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randint(-3, 4, p.shape, generator=g).float())
    x = torch.randint(-3, 4, (5, width), generator=g).float()
    return layer.eval(), x


def test_adamix_starts_as_the_base_with_equal_copies_and_trains_only_them(base):
    model = add_adamix(copy.deepcopy(base), r=4, alpha=8, copies=3)
    torch.testing.assert_close(model(IDX), base(IDX), rtol=0, atol=0)  # B = 0
    width, n_layer = base.config.n_embd, base.config.n_layer
    shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]  # (in, out)
    # three copies of A (r x in) and one B (out x r) per layer
    assert count_parameters(model)[0] == n_layer * sum(4 * (3 * i + o) for i, o in shapes)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    for layer in adamix_layers(model).values():
        assert all(torch.equal(a.weight, layer.lora_A[0].weight) for a in layer.lora_A)
        assert not torch.equal(layer.lora_A[0].weight, torch.zeros_like(layer.lora_A[0].weight))
    assert len(adamix_layers(model)) == n_layer * 4


def test_a_copy_gets_gradient_only_when_routed_and_adamw_leaves_the_others_as_they_were(base):
    model = randomize(add_adamix(copy.deepcopy(base), r=4, alpha=8, copies=4, seed=3)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(IDX[:, :-1], IDX[:, 1:])
        loss.backward()
        optimizer.step()
        routes = set()
        for name, layer in adamix_layers(model).items():
            routes.add(layer.last_route)
            for k, a in enumerate(layer.lora_A):
                routed = k == layer.last_route
                assert (a.weight.grad is not None) == routed, (step, name, k)
                assert torch.equal(a.weight, before[f"{name}.lora_A.{k}.weight"]) != routed
            assert layer.lora_B[0].weight.grad is not None  # the shared B learns on every pass
        assert len(routes) > 1  # layers draw their own copies


def test_routes_are_drawn_per_layer_per_pass_from_the_seed(base):
    def routes(seed, passes=6):
        model = add_adamix(copy.deepcopy(base), copies=4, seed=seed).train()
        drawn = []
        with torch.no_grad():
            for _ in range(passes):
                model(IDX)
                drawn.append([layer.last_route for layer in adamix_layers(model).values()])
        return drawn

    assert routes(5) == routes(5)
    assert routes(5) != routes(6)
    drawn = routes(5)
    assert len({tuple(r) for r in drawn}) > 1 and len({r for per_pass in drawn for r in per_pass}) == 4


def test_eval_mode_computes_with_the_average_of_the_copies(base):
    model = randomize(add_adamix(copy.deepcopy(base), copies=3)).eval()
    averaged = merge_adamix(copy.deepcopy(model))
    torch.testing.assert_close(model(IDX), averaged(IDX), rtol=1e-5, atol=1e-6)


def test_with_b_shared_the_merged_layer_is_exactly_the_average_of_its_copies_outputs():
    layer, x = integer_layer(share_b=True)
    copies_out = torch.stack([layer.to_lora(route=k)(x) for k in range(layer.copies)])
    assert torch.equal(layer.to_lora()(x), copies_out.mean(0))  # B (mean A) x = mean (B A_k x), to the bit
    assert torch.equal(layer(x), copies_out.mean(0))
    assert not torch.equal(copies_out[0], copies_out[1])  # the copies do differ


def test_without_sharing_the_merge_misses_the_average_by_the_copies_covariance():
    layer, x = integer_layer(share_b=False)
    M = layer.copies
    A = torch.stack([a.weight for a in layer.lora_A]).double()
    B = torch.stack([b.weight for b in layer.lora_B]).double()
    copies_out = torch.stack([layer.to_lora(route=k)(x) for k in range(M)]).double()
    gap = layer.to_lora()(x).double() - copies_out.mean(0)
    # mean_k B_k A_k - (mean B)(mean A) = mean_k (B_k - B̄)(A_k - Ā): what averaging A and B apart leaves out
    covariance = torch.einsum("kor,kri->oi", B - B.mean(0), A - A.mean(0)) / M
    torch.testing.assert_close(gap, -(x.double() @ covariance.T), rtol=0, atol=1e-9)
    assert gap.abs().max() >= 1  # integers: a gap is at least a quarter, here it is larger


def test_the_merged_model_is_a_lora_model_that_merges_into_the_base(base):
    model = randomize(add_adamix(copy.deepcopy(base), copies=4)).eval()
    out = model(IDX)
    lora = merge_adamix(model)
    assert not adamix_layers(lora) and len(lora_layers(lora)) == 4 * base.config.n_layer
    assert all(type(m) is LoRALinear and m.r == 8 for m in lora_layers(lora).values())
    torch.testing.assert_close(lora(IDX), out, rtol=1e-5, atol=1e-6)
    plain = merge_lora(lora)
    assert not lora_layers(plain) and all(type(m) is nn.Linear for m in plain.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(plain(IDX), out, rtol=1e-4, atol=1e-5)
    # merge_peft does both steps
    other = randomize(add_adamix(copy.deepcopy(base), copies=4)).eval()
    out = other(IDX)
    torch.testing.assert_close(merge_peft(other)(IDX), out, rtol=1e-4, atol=1e-5)
    assert not lora_layers(other) and not adamix_layers(other)


def test_a_single_route_keeps_one_copy_per_layer_drawn_from_its_seed(base):
    model = randomize(add_adamix(copy.deepcopy(base), copies=4)).eval()
    copies = {name: [a.weight.detach().clone() for a in layer.lora_A] for name, layer in adamix_layers(model).items()}
    picked = {}
    for seed in (0, 0, 1):
        single = merge_adamix(copy.deepcopy(model), route_seed=seed)
        picked.setdefault(seed, []).append(
            [next(k for k, a in enumerate(copies[name]) if torch.equal(a, layer.lora_A.weight))
             for name, layer in lora_layers(single).items()])
    assert picked[0][0] == picked[0][1] != picked[1][0]


def test_symmetric_kl_is_zero_for_equal_predictions_and_the_hand_computed_value_otherwise():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    assert symmetric_kl(p_logits, p_logits.clone()).item() == 0
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    per_token = (q * (q / p).log()).sum(-1) + (p * (p / q).log()).sum(-1)  # KL(q||p) + KL(p||q)
    expected = 0.5 * per_token.mean()
    torch.testing.assert_close(symmetric_kl(p_logits, q_logits).double(), expected, rtol=1e-6, atol=0)
    assert symmetric_kl(p_logits, q_logits) == symmetric_kl(q_logits, p_logits)
    # the targets are held fixed: the gradient reaches each side only through its own log-softmax
    p_logits.requires_grad_(True)
    symmetric_kl(p_logits, q_logits).backward()
    manual = torch.autograd.grad(0.5 * (q_logits.softmax(-1) * -p_logits.log_softmax(-1)).sum(-1).mean()
                                 + 0.5 * (p_logits.softmax(-1).detach() * (p_logits.log_softmax(-1).detach()
                                          - q_logits.log_softmax(-1))).sum(-1).mean(), p_logits)[0]
    torch.testing.assert_close(p_logits.grad, manual, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="logits and other_logits must have one shape"):
        symmetric_kl(p_logits, q_logits[:, :2])


def test_the_consistency_loss_adds_a_second_pass_and_its_weighted_symmetric_kl(base):
    ids = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))

    def first_step(weight):
        model = randomize(add_adamix(copy.deepcopy(base), copies=4, seed=2))
        passes = []
        model.register_forward_hook(lambda m, i, out: passes.append(out) if m.training else None)
        config = TrainConfig(steps=1, batch_size=2, block_size=16, eval_every=1, eval_batches=1,
                             consistency_weight=weight)
        history = train(model, ids, ids, config, progress=False)
        return history.train_loss[0], passes

    loss, passes = first_step(0.0)
    assert len(passes) == 1 and loss == pytest.approx(passes[0][1].item(), rel=0, abs=0)
    loss, passes = first_step(3.0)
    assert len(passes) == 2
    (logits, ce), (other, _) = passes
    kl = symmetric_kl(logits, other).item()
    assert kl > 0  # the two passes took different routes
    assert loss == pytest.approx(ce.item() + 3.0 * kl, rel=1e-6)


# --- refusals: named, and the model left exactly as it was ---

def quantized(base):
    from lora_edu.qlora import quantize_model

    return quantize_model(copy.deepcopy(base))


def one_layer_quantized(base):
    from lora_edu.nf4 import NF4Linear
    from lora_edu.plumbing import replace_module

    model = copy.deepcopy(base)
    mlp = model.transformer.h[1].mlp
    replace_module(mlp, "c_fc", NF4Linear.from_linear(mlp.c_fc))
    return model


REFUSALS = {
    "one copy": (None, lambda m: add_adamix(m, copies=1), ValueError, "copies must be an int >= 2"),
    "copies float": (None, lambda m: add_adamix(m, copies=2.0), ValueError, "copies must be an int >= 2"),
    "r zero": (None, lambda m: add_adamix(m, r=0), ValueError, "r must be a positive int"),
    "alpha nan": (None, lambda m: add_adamix(m, alpha=float("nan")), ValueError, "alpha must be a finite number"),
    "share_b 1": (None, lambda m: add_adamix(m, share_b=1), TypeError, "share_b must be True or False"),
    "seed": (None, lambda m: add_adamix(m, seed=0.5), TypeError, "seed must be an int"),
    "targets": (None, lambda m: add_adamix(m, targets=("lm_head",)), ValueError, "targets must be a non-empty list"),
    "on VeRA": (lambda m: add_vera(m, r=4), add_adamix, ValueError, "already has fine-tuning layers: VeRA"),
    "twice": (add_adamix, add_adamix, ValueError, "already has fine-tuning layers: AdaMix"),
    "4-bit base": (quantized, add_adamix, TypeError, r"transformer.h.0.attn.c_attn: layer must be an nn.Linear .*NF4Linear"),
    "a later 4-bit layer": (one_layer_quantized, add_adamix, TypeError, r"transformer.h.1.mlp.c_fc: layer must be"),
    "merge without AdaMix": (None, merge_adamix, ValueError, "model has no AdaMix layers"),
    "route seed": (add_adamix, lambda m: merge_adamix(m, route_seed="1"), TypeError, "seed must be an int"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_refusal_names_the_argument_and_leaves_the_model_unchanged(base, case):
    from unchanged import assert_unchanged, snapshot

    prepare, build, error, message = REFUSALS[case]
    model = copy.deepcopy(base) if prepare is None else prepare(copy.deepcopy(base))
    before = snapshot(model)
    with pytest.raises(error, match=message):
        build(model)
    assert_unchanged(model, before)


def test_adamix_on_hugging_face_gpt2_is_refused_by_name():
    pytest.importorskip("transformers")
    from hf_models import small_hf_gpt2
    from unchanged import assert_unchanged, snapshot

    hf = small_hf_gpt2()
    before = snapshot(hf)
    with pytest.raises(TypeError, match="must be a lora_edu GPT2, got GPT2LMHeadModel"):
        add_adamix(hf)
    assert_unchanged(hf, before)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), True, "1"])
def test_a_consistency_weight_must_be_finite_and_not_negative(weight):
    with pytest.raises(ValueError, match="consistency_weight must be a finite number >= 0"):
        TrainConfig(consistency_weight=weight)


def test_adamix_layer_refuses_layers_it_cannot_average():
    from lora_edu.nf4 import NF4Linear

    with pytest.raises(TypeError, match="layer must be an nn.Linear"):
        AdaMixLinear(NF4Linear.from_linear(nn.Linear(64, 64)), r=2, alpha=2, copies=2)
    with pytest.raises(TypeError, match="layer must be an nn.Linear"):
        AdaMixLinear(nn.Embedding(4, 4), r=2, alpha=2, copies=2)
    with pytest.raises(ValueError, match="route must be a non-negative int below copies"):
        AdaMixLinear(nn.Linear(4, 4), r=2, alpha=2, copies=2).to_lora(route=2)

