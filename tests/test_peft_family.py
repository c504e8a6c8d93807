"""LoRA's relatives: each trains only its own parameters, counts them right, and merges exactly where it claims to.
A test that compares with PEFT skips alone where PEFT is missing."""

import copy
import math

import pytest
import torch

from lora_edu.gpt2 import GPT2, GPT2Config, load_tiny
from lora_edu.lora import add_lora, count_parameters
from lora_edu.peft_family import (
    PrefixAttention,
    PromptTuned,
    ScaleInput,
    ScaleOutput,
    SerialAdapter,
    VeRALinear,
    adapter_parameters,
    add_bitfit,
    add_ia3,
    add_prefix_tuning,
    add_serial_adapters,
    add_vera,
    merge_peft,
)

IDX = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base():
    return load_tiny().eval()


def one_step_changes(model, lr=1e-2):
    """Names of the parameters one SGD step changes."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    _, loss = model(IDX[:, :-1], IDX[:, 1:])
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    model.eval()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_bitfit_trains_the_biases_only(base):
    model = add_bitfit(copy.deepcopy(base))
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    # per block: c_attn 384, attn.c_proj 128, c_fc 512, mlp.c_proj 128, ln_1 128, ln_2 128; and ln_f 128
    assert count_parameters(model)[0] == 4 * (384 + 128 + 512 + 128 + 128 + 128) + 128
    torch.testing.assert_close(model(IDX), base(IDX), rtol=0, atol=0)
    changed = one_step_changes(model)
    assert changed and changed <= set(biases)
    out = model(IDX)
    assert merge_peft(model) is model  # the trained biases are the model's: nothing to merge
    torch.testing.assert_close(model(IDX), out, rtol=0, atol=0)


def test_ia3_starts_as_the_base_and_rescales_keys_values_and_mlp_activations(base):
    model = add_ia3(copy.deepcopy(base))
    assert count_parameters(model)[0] == 4 * (2 * 128 + 512)
    torch.testing.assert_close(model(IDX), base(IDX), rtol=0, atol=0)
    block = model.transformer.h[0]
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        block.attn.c_attn.scale.mul_(2)
    q, kv = block.attn.c_attn(x).split([128, 256], dim=-1)
    q0, kv0 = block.attn.c_attn.layer(x).split([128, 256], dim=-1)
    torch.testing.assert_close(q, q0)  # the queries are not rescaled
    torch.testing.assert_close(kv, 2 * kv0)
    changed = one_step_changes(model)
    assert changed and all(n.endswith(".scale") for n in changed)


def test_ia3_merges_exactly(base):
    model = add_ia3(copy.deepcopy(base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        want = model(IDX)
    merged = merge_peft(model)
    assert not any(isinstance(m, (ScaleInput, ScaleOutput)) for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX), want, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_trains_its_virtual_tokens_only_and_uses_context(base):
    model = PromptTuned(copy.deepcopy(base), n_virtual=8)
    assert count_parameters(model)[0] == 8 * 128
    logits = model(IDX)
    assert logits.shape == base(IDX).shape
    assert not torch.allclose(logits, base(IDX))  # unlike LoRA, it changes the model from the start
    assert one_step_changes(model) == {"prompt"}
    with pytest.raises(ValueError, match="at most 120 tokens"):
        model(torch.zeros(1, 121, dtype=torch.long))
    with pytest.raises(TypeError, match="prompt tuning cannot be merged"):
        merge_peft(model)


def test_prompt_tuning_is_the_base_model_reading_its_virtual_tokens_first(base):
    model = PromptTuned(copy.deepcopy(base), n_virtual=3)
    tokens = torch.tensor([[5, 17, 99]])  # make the virtual tokens real ones: the base model must agree
    with torch.no_grad():
        model.prompt.copy_(base.transformer.wte.weight[tokens[0]])
        want = base(torch.cat([tokens.expand(2, -1), IDX], dim=1))[:, 3:]
        torch.testing.assert_close(model(IDX), want, rtol=1e-5, atol=1e-5)


def reference_prefix_attention(layer: PrefixAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: every token sees the whole prefix and itself and the tokens before it."""
    attn, n = layer.attn, layer.n_prefix
    B, T, C = x.shape
    h = attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    k = torch.cat([layer.prefix_keys.expand(B, -1, -1), k], dim=1)
    v = torch.cat([layer.prefix_values.expand(B, -1, -1), v], dim=1)
    q, k, v = (t.view(B, -1, h, C // h).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // h)  # (B, h, T, n + T)
    allowed = torch.cat([torch.ones(T, n, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
    y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


def test_prefix_tuning_attends_to_the_prefix_and_causally_to_the_rest(base):
    model = add_prefix_tuning(copy.deepcopy(base), n_prefix=4)
    assert count_parameters(model)[0] == 4 * 2 * 4 * 128
    layer = model.transformer.h[1].attn
    x = torch.randn(2, 6, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_prefix_attention(layer, x), rtol=1e-5, atol=1e-5)
    changed = one_step_changes(model)
    assert changed and all("prefix_" in n for n in changed)
    with pytest.raises(TypeError, match="prefix tuning cannot be merged"):
        merge_peft(model)


def test_the_prefix_starts_as_real_tokens_keys_and_values(base):
    """Initialised from the model's own keys and values for real tokens: reading them as a prefix
    is reading those tokens first, in the first layer."""
    model = add_prefix_tuning(copy.deepcopy(base), n_prefix=3, seed=5)
    tokens = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(5))
    layer = model.transformer.h[0].attn
    x = base.transformer.wte(tokens) + base.transformer.wpe(torch.arange(3))
    _, k, v = layer.attn.c_attn(base.transformer.h[0].ln_1(x)).split(128, dim=-1)
    torch.testing.assert_close(layer.prefix_keys, k[0].detach())
    torch.testing.assert_close(layer.prefix_values, v[0].detach())


@pytest.mark.parametrize("sublayers, per_block", [(("attn", "mlp"), 2), (("mlp",), 1)])
def test_fresh_serial_adapters_change_nothing_and_count_their_parameters(base, sublayers, per_block):
    model = add_serial_adapters(copy.deepcopy(base), bottleneck=4, sublayers=sublayers)
    torch.testing.assert_close(model(IDX), base(IDX), rtol=0, atol=0)  # up starts at zero: the identity
    width = base.config.n_embd
    per_adapter = 2 * width * 4 + 4 + width  # down and up, with biases
    assert adapter_parameters(model) == base.config.n_layer * per_block * per_adapter
    assert count_parameters(model)[0] == adapter_parameters(model)


def test_only_the_serial_adapters_learn(base):
    model = add_serial_adapters(copy.deepcopy(base), bottleneck=4)
    # up starts at zero, so down gets no gradient at first (as LoRA's A when B = 0): two steps
    first, second = one_step_changes(model), one_step_changes(model)
    assert first == {n for n, _ in model.named_parameters() if ".up." in n}
    assert first | second == {n for n, _ in model.named_parameters() if ".up." in n or ".down." in n}


def test_adapters_are_refused_by_merge_peft(base):
    with pytest.raises(TypeError, match="serial adapters cannot be merged"):
        merge_peft(add_serial_adapters(copy.deepcopy(base), bottleneck=4))


@pytest.mark.parametrize("build, error, message", [
    (lambda m: add_ia3(add_ia3(m)), ValueError, "already has"),
    (lambda m: add_prefix_tuning(add_prefix_tuning(m, 2), 2), ValueError, "already has"),
    (lambda m: add_prefix_tuning(m, 0), ValueError, "n_prefix must be a positive int"),
    (lambda m: add_prefix_tuning(m, 128), ValueError, "below block_size"),
    (lambda m: PromptTuned(m, 128), ValueError, r"n_virtual must be a positive int below block_size \(128\)"),
    (lambda m: add_bitfit(torch.nn.Linear(2, 2)), TypeError, "must be a lora_edu GPT2"),
    (lambda m: add_serial_adapters(torch.nn.Linear(2, 2), 4), TypeError, "model must be a lora_edu GPT2"),
    (lambda m: add_serial_adapters(m, 4, ("ffn",)), ValueError, "sublayers must be a non-empty list of names"),
    (lambda m: add_serial_adapters(m, 4, ()), ValueError, "sublayers must be a non-empty list of names"),
    (lambda m: add_serial_adapters(add_serial_adapters(m, 4), 4), ValueError,
     "already has fine-tuning layers: serial adapters"),
    (lambda m: SerialAdapter(torch.nn.Identity(), 8.0, 2), ValueError, "d must be a positive int"),
])
def test_bad_requests_are_refused(base, build, error, message):
    with pytest.raises(error, match=message):
        build(copy.deepcopy(base))


# ---------------------------------------------------------------------------------------
# The same methods in PEFT, on Hugging Face's GPT-2 (its weights copied into our GPT2)
# ---------------------------------------------------------------------------------------


def test_prompt_tuning_equals_peft_prompt_tuning_on_hf_gpt2(ours_and_hf):
    """PEFT's prompt tuning puts its virtual tokens first too; its logits include theirs, which we drop."""
    peft = pytest.importorskip("peft")
    ours, hf = ours_and_hf
    n = 4
    theirs = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)).eval()
    prompt = 0.3 * torch.randn(n, ours.config.n_embd, generator=torch.Generator().manual_seed(1))
    tuned = PromptTuned(ours, n).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(prompt)
        tuned.prompt.copy_(prompt)
        idx = torch.randint(0, ours.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
        want = theirs(input_ids=idx).logits[:, n:]
        got = tuned(idx)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ia3_equals_peft_ia3_with_the_queries_held_at_one_on_hf_gpt2(ours_and_hf):
    """PEFT scales all of GPT-2's fused c_attn output; the paper (and we) scale keys and values only."""
    peft = pytest.importorskip("peft")
    ours, hf = ours_and_hf
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                            feedforward_modules=["mlp.c_proj"])
    theirs = peft.get_peft_model(hf, config).eval()
    add_ia3(ours)
    width = ours.config.n_embd
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, block in enumerate(ours.transformer.h):
            keys_values = 1 + 0.3 * torch.randn(2 * width, generator=g)
            hidden = 1 + 0.3 * torch.randn(4 * width, generator=g)
            block.attn.c_attn.scale.copy_(keys_values)
            block.mlp.c_proj.scale.copy_(hidden)
            theirs_block = theirs.base_model.model.transformer.h[i]
            qkv = theirs_block.attn.c_attn.ia3_l["default"]
            qkv.copy_(torch.cat([torch.ones(width), keys_values]).view(qkv.shape))
            mlp = theirs_block.mlp.c_proj.ia3_l["default"]
            mlp.copy_(hidden.view(mlp.shape))
        idx = torch.randint(0, ours.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(ours(idx), theirs(input_ids=idx).logits, atol=1e-5, rtol=1e-5)
    # PEFT trains the queries' entries too: n_embd more numbers per layer than the paper's (IA)³
    theirs_trained = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count_parameters(ours)[0] == theirs_trained - width * ours.config.n_layer


def test_the_benchmark_times_every_method_and_merges_exactly_those_it_calls_mergeable():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import peft_family as benchmark

    timing = benchmark.latency(repeats=1)
    methods = [m for m in benchmark.METHODS if m != "full"]
    mergeable = [m for m in methods if benchmark.METHODS[m][2]]
    assert set(timing["over_base"]) == {"base", *methods, *(m + "_merged" for m in mergeable)}
    assert timing["over_base"]["base"] == 1 and all(t > 0 for t in timing["median_seconds"].values())


def test_the_benchmark_adds_new_methods_timings_to_a_resumed_record_and_evaluates_adamix_through_single_routes():
    import sys
    from pathlib import Path

    from lora_edu.data import load_split

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import peft_family as benchmark

    old = benchmark.latency(repeats=1, methods=["lora"])
    resumed = benchmark.with_latency_of_new_methods(old, repeats=1)
    assert resumed["over_base"]["lora"] == old["over_base"]["lora"]  # what was measured is kept
    assert {"adamix", "adamix_merged", "vera", "vera_merged"} <= set(resumed["over_base"])
    assert list(resumed["timed_apart"]) == [", ".join(m for m in benchmark.METHODS if m not in ("full", "lora"))]
    assert benchmark.with_latency_of_new_methods(resumed, repeats=1) == resumed

    data = {"milton_train": load_split("milton", "train"), "milton_val": load_split("milton", "val")[:2000],
            "shakespeare_val": load_split("shakespeare", "val")[:2000]}
    steps = benchmark.step_cost(repeats=1, data=data)
    assert set(steps["over_lora"]) == {"lora", "adamix", "adamix_no_consistency"} and steps["over_lora"]["lora"] == 1
    run = benchmark.run("adamix", 1e-2, 0, steps=2, data=data)
    assert run["trainable_parameters"] == 4 * (8 * 8 * 896 + 8 * 1152)  # 8 copies of A, one B, every matrix
    assert [s["route_seed"] for s in run["single_route"]] == list(benchmark.ROUTE_SEEDS)
    assert len({s["milton_val_loss"] for s in run["single_route"]}) > 1  # the routes differ
    assert run == benchmark.run("adamix", 1e-2, 0, steps=2, data=data)  # the seed fixes copies and routes


# ---------------------------------------------------------------------------------------
# VeRA: LoRA with frozen, shared, random A and B, and two trained vectors per layer
# ---------------------------------------------------------------------------------------


def test_vera_starts_as_the_base_trains_two_vectors_per_layer_and_merges_exactly(base):
    model = add_vera(copy.deepcopy(base), r=16).eval()
    with torch.no_grad():
        assert torch.equal(model(IDX), base(IDX))
    layers = [m for m in model.modules() if isinstance(m, VeRALinear)]
    assert len(layers) == 16
    assert layers[0].A.data_ptr() == layers[4].A.data_ptr()  # one matrix in memory, shared by the blocks
    assert count_parameters(model)[0] == sum(16 + layer.layer.out_features for layer in layers)
    # b starts at 0, so d gets no gradient at first (as LoRA's A when B = 0): two steps
    first, second = one_step_changes(model), one_step_changes(model)
    assert first == {n for n, _ in model.named_parameters() if n.endswith(".b")}
    assert first | second == {n for n, _ in model.named_parameters() if n.endswith((".d", ".b"))}
    with torch.no_grad():
        for layer in layers:
            layer.d.normal_(), layer.b.normal_(std=0.1)
        before = model(IDX)
        merged = merge_peft(model)
        assert not any(isinstance(m, VeRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(IDX), before, atol=1e-4, rtol=1e-4)


def test_vera_equals_peft_vera_on_hf_gpt2_with_the_same_projection_seed(ours_and_hf):
    peft = pytest.importorskip("peft")
    ours, hf = ours_and_hf
    config = peft.VeraConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"], projection_prng_key=3,
                             fan_in_fan_out=True)
    theirs = peft.get_peft_model(hf, config).eval()
    add_vera(ours, r=8, seed=3).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, VeRALinear):
                module.d.copy_(torch.randn(module.d.shape, generator=g))
                module.b.copy_(0.1 * torch.randn(module.b.shape, generator=g))
                twin = theirs.base_model.model.get_submodule(name)
                twin.vera_lambda_d["default"].copy_(module.d)
                twin.vera_lambda_b["default"].copy_(module.b)
        idx = torch.randint(0, ours.config.vocab_size, (2, 9), generator=g)
        torch.testing.assert_close(ours(idx), theirs(input_ids=idx).logits, atol=1e-5, rtol=1e-5)
    trained = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count_parameters(ours)[0] == trained


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive int"),
    (dict(r=True), "r must be a positive int"),
    (dict(targets=("attn.c_attn", "lm_head")), "targets must be a non-empty list of names"),
    (dict(targets=()), "targets must be a non-empty list of names"),
])
def test_vera_refuses_bad_arguments_by_name(base, kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_vera(copy.deepcopy(base), **kwargs)


def test_vera_twice_is_refused(base):
    model = add_vera(copy.deepcopy(base), r=4)
    with pytest.raises(ValueError, match="already has fine-tuning layers: VeRA"):
        add_vera(model, r=4)


# ---------------------------------------------------------------------------------------
# Refusals name what is refused and leave the model exactly as it was (issue 26)
# ---------------------------------------------------------------------------------------


def with_lora(m):
    return add_lora(m, ["c_attn"], r=2, alpha=4)


def with_ia3(m):
    return add_ia3(m)


def with_vera(m):
    return add_vera(m, r=4)


def vera(m, **kwargs):
    return add_vera(m, **{"r": 4, **kwargs})


REFUSALS = {
    # another method's layers
    "ia3 on LoRA": (with_lora, add_ia3, "already has fine-tuning layers: LoRA"),
    "ia3 on VeRA": (with_vera, add_ia3, "already has fine-tuning layers: VeRA"),
    "vera on LoRA": (with_lora, vera, "already has fine-tuning layers: LoRA"),
    "vera on (IA)3": (with_ia3, vera, r"already has fine-tuning layers: \(IA\)³"),
    "prefix on LoRA": (with_lora, lambda m: add_prefix_tuning(m, 2), "already has fine-tuning layers: LoRA"),
    "prompt on (IA)3": (with_ia3, lambda m: PromptTuned(m, 2), r"already has fine-tuning layers: \(IA\)³"),
    "adapters on VeRA": (with_vera, lambda m: add_serial_adapters(m, 4), "already has fine-tuning layers: VeRA"),
    # bad arguments, refused before anything is frozen or replaced
    "vera target twice": (None, lambda m: vera(m, targets=("attn.c_attn", "attn.c_attn")), "'attn.c_attn' twice"),
    "vera d_initial nan": (None, lambda m: vera(m, d_initial=float("nan")), "d_initial must be a finite number"),
    "vera d_initial inf": (None, lambda m: vera(m, d_initial=float("inf")), "d_initial must be a finite number"),
    "vera targets string": (None, lambda m: vera(m, targets="attn.c_attn"), "targets must be a non-empty list"),
    "adapters bottleneck 0": (None, lambda m: add_serial_adapters(m, 0), "bottleneck must be a positive int"),
    "adapters sublayer twice": (None, lambda m: add_serial_adapters(m, 4, ("mlp", "mlp")), "twice"),
    "prefix seed": (None, lambda m: add_prefix_tuning(m, 2, seed=1.5), "seed must be an int"),
    "prompt seed": (None, lambda m: PromptTuned(m, 2, seed="0"), "seed must be an int"),
    "prompt too many": (None, lambda m: PromptTuned(m, 128), "n_virtual must be a positive int below block_size"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_refusal_of_the_family_names_it_and_leaves_the_model_unchanged(base, case):
    from unchanged import assert_unchanged, snapshot

    prepare, build, message = REFUSALS[case]
    model = copy.deepcopy(base)
    if prepare is not None:
        model = prepare(model)
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        build(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["ia3", "vera", "prompt", "prefix", "adapters", "bitfit"])
def test_hugging_face_gpt2_is_refused_up_front_and_left_unchanged(name):
    """The family is built for the book's GPT2 (nn.Linear layers, its config); HF's GPT-2 is named and refused."""
    pytest.importorskip("transformers")
    from hf_models import small_hf_gpt2
    from unchanged import assert_unchanged, snapshot

    build = {"ia3": add_ia3, "vera": vera, "prompt": lambda m: PromptTuned(m, 2),
             "prefix": lambda m: add_prefix_tuning(m, 2), "adapters": lambda m: add_serial_adapters(m, 4),
             "bitfit": add_bitfit}[name]
    hf = small_hf_gpt2()
    before = snapshot(hf)
    with pytest.raises(TypeError, match="must be a lora_edu GPT2, got GPT2LMHeadModel .*Hugging Face GPT-2.*PEFT"):
        build(hf)
    assert_unchanged(hf, before)


def test_the_prefix_starts_from_the_same_activations_in_train_mode_whatever_the_global_random_state():
    """Dropout is off while the starting keys and values are computed, and the modes are put back."""
    torch.manual_seed(0)
    template = GPT2(GPT2Config(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.3))
    prefixes = []
    for global_seed in (1, 2):
        model = copy.deepcopy(template).train()
        torch.manual_seed(global_seed)
        add_prefix_tuning(model, 3, seed=0)
        assert all(m.training for m in model.modules())
        prefixes.append(torch.cat([b.attn.prefix_keys for b in model.transformer.h]))
    torch.testing.assert_close(prefixes[0], prefixes[1], rtol=0, atol=0)
    eval_model = add_prefix_tuning(copy.deepcopy(template).eval(), 3, seed=0)
    torch.testing.assert_close(torch.cat([b.attn.prefix_keys for b in eval_model.transformer.h]), prefixes[0],
                               rtol=0, atol=0)
