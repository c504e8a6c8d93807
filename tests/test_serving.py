"""Serving many adapters: the gathered and segmented kernels equal the loop, and a mixed batch of LoRA and DoRA
adapters equals each adapter alone."""

import copy
import json

import pytest
import torch

from hf_models import small_hf_gpt2
from lora_edu.gpt2 import generate
from lora_edu.lora import add_lora, lora_layers
from lora_edu.peft_format import load_adapter, save_adapter
from lora_edu.serving import MultiAdapterModel, MultiLoRALinear, dora_scale, gather_bmm, lora_loop, segments, sgmv


def pool(n=4, r_max=3, d_in=6, d_out=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r_max, d_in, generator=g, dtype=dtype)
    B = torch.randn(n, d_out, r_max, generator=g, dtype=dtype)
    scaling = torch.rand(n, generator=g, dtype=dtype) + 0.5
    return A, B, scaling


def test_gather_bmm_and_sgmv_equal_the_loop_token_by_token():
    A, B, scaling = pool()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # tokens of several requests, flattened: unsorted, repeated, with tokens that use no adapter
    indices = torch.tensor([2, 2, -1, 0, 2, 3, -1, 0, 1])
    want = lora_loop(x, A, B, indices, scaling)
    assert want[2].abs().max() == 0 and want[0].abs().max() > 0
    for token, i in enumerate(indices.tolist()):  # the loop itself, against the formula
        expected = torch.zeros(5, dtype=torch.float64) if i < 0 else scaling[i] * B[i] @ (A[i] @ x[token])
        torch.testing.assert_close(want[token], expected)
    torch.testing.assert_close(gather_bmm(x, A, B, indices, scaling), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sgmv(x, A, B, indices, scaling), want, rtol=1e-12, atol=1e-12)


def test_minus_one_is_no_adapter_not_the_last_one():
    A, B, scaling = pool()
    x = torch.randn(3, 6, dtype=torch.float64)
    indices = torch.tensor([-1, 3, -1])
    delta = gather_bmm(x, A, B, indices, scaling)
    assert delta[0].abs().max() == 0 and delta[2].abs().max() == 0
    # what a plain gather does with -1 (vLLM's torch reference did): the last adapter
    naive = torch.einsum("bi,bri->br", x, A[indices])
    naive = torch.einsum("br,bor->bo", naive, B[indices]) * scaling[indices][:, None]
    assert naive[0].abs().max() > 0
    torch.testing.assert_close(naive[1], delta[1])


def test_segments_group_rows_by_adapter_in_a_stable_order():
    order, adapters, counts = segments(torch.tensor([2, -1, 0, 2, 0]))
    assert order.tolist() == [1, 2, 4, 0, 3]
    assert adapters == [-1, 0, 2] and counts == [1, 2, 2]


def test_a_lower_rank_adapter_padded_with_zeros_gives_its_own_delta():
    g = torch.Generator().manual_seed(2)
    a2, b2 = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)  # rank 2
    a4, b4 = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)  # rank 4
    A, B = torch.zeros(2, 4, 6), torch.zeros(2, 5, 4)
    A[0, :2], B[0, :, :2] = a2, b2
    A[1], B[1] = a4, b4
    scaling = torch.tensor([0.5, 2.0])
    x = torch.randn(2, 6, generator=g)
    delta = gather_bmm(x, A, B, torch.tensor([0, 1]), scaling)
    torch.testing.assert_close(delta[0], 0.5 * (x[0] @ a2.T) @ b2.T)
    torch.testing.assert_close(delta[1], 2.0 * (x[1] @ a4.T) @ b4.T)


@pytest.mark.parametrize("kernel", [gather_bmm, sgmv, lora_loop])
@pytest.mark.parametrize("change, message", [
    (lambda x, A, B, i, s: (x[:, :-1], A, B, i, s), "x must be"),
    (lambda x, A, B, i, s: (x[:, None], A, B, i, s), r"flat list of tokens, \(tokens, in\)"),
    (lambda x, A, B, i, s: (x, A, B[:, :, :-1], i, s), "B must be"),
    (lambda x, A, B, i, s: (x, A, B, i[:-1], s), "one adapter index per token"),
    (lambda x, A, B, i, s: (x, A, B, i.float(), s), "long tensor"),
    (lambda x, A, B, i, s: (x, A, B, torch.full_like(i, 4), s), r"must lie in \[-1, 3\]"),
    (lambda x, A, B, i, s: (x, A, B, torch.full_like(i, -2), s), r"must lie in \[-1, 3\]"),
    (lambda x, A, B, i, s: (x, A, B, i, s[:-1]), "scaling must have one entry per adapter"),
])
def test_bad_pools_and_indices_are_refused_by_name(kernel, change, message):
    A, B, scaling = pool()
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        kernel(*change(x, A, B, torch.tensor([0, 1, -1]), scaling))


# --- MultiAdapterModel ---

def trained_adapter(base, folder, targets, r, alpha, seed, use_rslora=False, use_dora=False):
    """An adapter that looks trained: B nonzero and, for DoRA, magnitudes moved off ||W0||."""
    model = add_lora(copy.deepcopy(base), targets, r=r, alpha=alpha, use_rslora=use_rslora, use_dora=use_dora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))
            if use_dora:
                layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape, generator=g))
    save_adapter(model, folder)
    return folder


@pytest.fixture
def ours(tmp_path, make_gpt2):
    base = make_gpt2()
    adapters = {
        "poetry": trained_adapter(base, tmp_path / "poetry", "all-linear", r=4, alpha=8, seed=1),
        "legal": trained_adapter(base, tmp_path / "legal", ["attn.c_attn"], r=2, alpha=4, seed=2),
        "code": trained_adapter(base, tmp_path / "code", ["mlp.c_fc", "attn.c_proj"], r=8, alpha=8, seed=3,
                                use_rslora=True),
    }
    return base, adapters


def alone(base, folder, idx):
    if folder is None:
        return base(idx)
    return load_adapter(copy.deepcopy(base), folder).eval()(idx)


KERNELS = ["gather_bmm", "sgmv", "loop"]


def served_equals_each_alone(base, adapters, names, kernel, seed):
    """Serve ``names`` as one batch and check each row against its adapter loaded alone."""
    idx = torch.randint(0, 50, (len(names), 12), generator=torch.Generator().manual_seed(seed))
    served = MultiAdapterModel(copy.deepcopy(base), adapters, kernel=kernel).eval()
    with torch.no_grad():
        logits = served(idx, names)
        for row, name in enumerate(names):
            want = alone(base, adapters.get(name), idx[row:row + 1])
            torch.testing.assert_close(logits[row:row + 1], want, rtol=1e-5, atol=1e-5)
    return served, (idx, logits)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_mixed_batch_equals_each_adapter_served_alone(ours, kernel):
    base, adapters = ours
    served, _ = served_equals_each_alone(base, adapters, ["poetry", None, "code", "legal", "poetry", "code"],
                                         kernel, seed=4)
    assert served.r_max == 8
    assert not any(p.requires_grad for p in served.parameters())


def test_generate_gives_each_row_its_adapters_continuation(ours):
    base, adapters = ours
    names = ["legal", None, "poetry"]
    idx = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(5))
    served = MultiAdapterModel(copy.deepcopy(base), adapters).eval()
    out = served.generate(idx, names, 6, top_k=1)  # greedy: no sampling noise between the two runs
    for row, name in enumerate(names):
        model = base if name is None else load_adapter(copy.deepcopy(base), adapters[name]).eval()
        assert torch.equal(out[row:row + 1], generate(model, idx[row:row + 1], 6, top_k=1))


def test_the_pool_holds_every_adapter_once_padded_to_the_largest_rank(ours):
    base, adapters = ours
    served = MultiAdapterModel(copy.deepcopy(base), adapters)
    c_attn = served.pools()["transformer.h.0.attn.c_attn"]
    assert c_attn.A.shape == (3, 8, 32) and c_attn.B.shape == (3, 96, 8)
    assert c_attn.A[2].abs().max() == 0  # "code" does not target c_attn: zero there
    assert c_attn.A[1, 2:].abs().max() == 0  # "legal" is rank 2: padded
    n_pools = len(served.pools())
    assert n_pools == 8  # 4 block matrices x 2 layers
    assert served.pool_bytes() == sum(4 * (3 * 8 * (p.in_features + p.out_features) + 3)
                                      for p in served.pools().values())


def test_bad_requests_and_bad_adapters_get_clear_errors(ours, tmp_path, make_gpt2):
    base, adapters = ours
    served = MultiAdapterModel(copy.deepcopy(base), adapters)
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"unknown adapter names \['prose'\]"):
        served(idx, ["poetry", "prose"])
    with pytest.raises(ValueError, match=r"one name \(a str, or None for the base model\) per row, 2 rows"):
        served(idx, ["poetry"])
    with pytest.raises(ValueError, match="rank above the pool's max_rank=4"):
        MultiAdapterModel(copy.deepcopy(base), adapters, max_rank=4)
    other = trained_adapter(make_gpt2(n_embd=16), tmp_path / "other", ["attn.c_attn"], r=2, alpha=4, seed=6)
    with pytest.raises(ValueError, match="another base model"):
        MultiAdapterModel(copy.deepcopy(base), {"other": other})
    with pytest.raises(ValueError, match="already has LoRA layers"):
        MultiAdapterModel(add_lora(copy.deepcopy(base)), adapters)
    with pytest.raises(ValueError, match="kernel must be one of"):
        MultiAdapterModel(copy.deepcopy(base), adapters, kernel="fast")


def test_a_refused_adapter_leaves_the_base_model_unchanged(ours, tmp_path):
    base, adapters = ours
    model = copy.deepcopy(base)
    config = json.loads((adapters["legal"] / "adapter_config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attention"]}))
    (broken / "adapter_model.safetensors").write_bytes((adapters["legal"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="targets 'c_attention'"):
        MultiAdapterModel(model, {**adapters, "broken": broken})
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="IA3"), r"adapter 'legal' holds a 'IA3' adapter, not LORA"),
    (dict(rank_pattern={"c_attn": 4}), r"adapter 'legal' uses rank_pattern=.*which lora_edu does not support"),
])
def test_an_adapter_of_another_kind_is_refused_by_its_name(ours, tmp_path, changes, message):
    """The checks of load_adapter (lora_edu.peft_format.read_adapter), naming the adapter served."""
    base, adapters = ours
    config = json.loads((adapters["legal"] / "adapter_config.json").read_text())
    (adapters["legal"] / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=message):
        MultiAdapterModel(copy.deepcopy(base), adapters)


def test_equal_to_peft_mixed_batch_inference_on_hf_gpt2(tmp_path):
    peft = pytest.importorskip("peft")
    hf = small_hf_gpt2()
    folders = {
        "a": trained_adapter(hf, tmp_path / "a", ["c_attn", "c_proj"], r=4, alpha=8, seed=7),
        "b": trained_adapter(hf, tmp_path / "b", ["c_fc"], r=2, alpha=2, seed=8),
    }
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), folders["a"], adapter_name="a")
    theirs.load_adapter(folders["b"], adapter_name="b")
    theirs.eval()
    names = ["b", None, "a", "a"]
    idx = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(9))
    served = MultiAdapterModel(copy.deepcopy(hf), folders).eval()
    with torch.no_grad():
        want = theirs(input_ids=idx, adapter_names=[n or "__base__" for n in names]).logits
        got = served(idx, names).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = served.generate(idx[:, :4], names, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for row, name in enumerate(names):
        model = hf if name is None else load_adapter(copy.deepcopy(hf), folders[name]).eval()
        want = model.generate(idx[row:row + 1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row:row + 1], want)


# --- DoRA adapters in a mixed batch ---

@pytest.fixture
def with_dora(ours, tmp_path):
    base, adapters = ours
    adapters = {
        **adapters,
        "dora_all": trained_adapter(base, tmp_path / "dora_all", "all-linear", r=4, alpha=8, seed=11, use_dora=True),
        "dora_attn": trained_adapter(base, tmp_path / "dora_attn", ["attn.c_attn", "mlp.c_proj"], r=2, alpha=2,
                                     seed=12, use_dora=True, use_rslora=True),
    }
    return base, adapters


@pytest.mark.parametrize("kernel", KERNELS)
def test_dora_adapters_mix_with_lora_ones_and_equal_each_alone(with_dora, kernel):
    base, adapters = with_dora
    names = ["dora_all", "poetry", None, "dora_attn", "code", "dora_all", "legal", None]
    served, (idx, logits) = served_equals_each_alone(base, adapters, names, kernel, seed=13)
    with torch.no_grad():
        # the DoRA rows differ from the same adapter with its rescaling dropped: g matters
        no_g = copy.deepcopy(served)
        for layer in no_g.pools().values():
            if layer.g is not None:
                layer.g.fill_(1.0)
        assert (no_g(idx, names)[0] - logits[0]).abs().max() > 1e-2


def test_the_dora_scale_is_computed_once_per_adapter_and_layer(with_dora):
    base, adapters = with_dora
    served = MultiAdapterModel(copy.deepcopy(base), adapters)
    names = served.names
    c_attn = served.pools()["transformer.h.0.attn.c_attn"]
    c_fc = served.pools()["transformer.h.0.mlp.c_fc"]
    assert c_attn.g.shape == (len(names), 96)
    dora = load_adapter(copy.deepcopy(base), adapters["dora_attn"])
    layer = lora_layers(dora)["transformer.h.0.attn.c_attn"]
    with torch.no_grad():
        torch.testing.assert_close(c_attn.g[names.index("dora_attn")], layer.magnitude / layer.weight_norm())
        torch.testing.assert_close(dora_scale(layer.base_weight(), layer.lora_A.weight, layer.lora_B.weight,
                                              layer.scaling, layer.magnitude), layer.magnitude / layer.weight_norm())
    for lora_name in ("poetry", "legal", "code"):  # plain LoRA: g stays one
        assert torch.equal(c_attn.g[names.index(lora_name)], torch.ones(96))
    assert torch.equal(c_fc.g[names.index("dora_attn")], torch.ones(128))  # dora_attn does not target c_fc
    assert (c_attn.g[names.index("dora_all")] - 1).abs().max() > 0.05
    # a layer that no DoRA adapter targets holds no g
    plain = MultiAdapterModel(copy.deepcopy(base), {k: adapters[k] for k in ("poetry", "legal")})
    assert all(p.g is None for p in plain.pools().values())


def test_a_dora_adapter_without_its_magnitudes_is_refused_and_changes_nothing(with_dora, tmp_path):
    from safetensors.torch import load_file, save_file

    base, adapters = with_dora
    broken = tmp_path / "no_magnitude"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters["dora_attn"] / "adapter_config.json").read_text())
    state = load_file(str(adapters["dora_attn"] / "adapter_model.safetensors"))
    dropped = next(k for k in state if "magnitude" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, str(broken / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="missing .*magnitude"):
        MultiAdapterModel(model, {**adapters, "broken": broken})
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]


def test_a_layer_serves_a_different_adapter_for_each_token(ours):
    """Tokens, not rows: indices of shape (batch, seq), as when several requests share one row."""
    base, adapters = ours
    served = MultiAdapterModel(copy.deepcopy(base), adapters)
    layer = served.pools()["transformer.h.1.attn.c_attn"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(14))
    per_token = torch.tensor([[0, 0, 1, -1, 2], [2, -1, -1, 0, 1]])
    layer.indices = per_token
    with torch.no_grad():
        got = layer(x)
        want = layer.base_layer(x) + lora_loop(x.reshape(10, 32), layer.A, layer.B, per_token.reshape(10),
                                               layer.scaling).view(2, 5, 96)
        torch.testing.assert_close(got, want)
        for b in range(2):
            for t in range(5):
                i = per_token[b, t].item()
                expected = layer.base_layer(x[b, t])
                if i >= 0:
                    expected = expected + layer.scaling[i] * layer.B[i] @ (layer.A[i] @ x[b, t])
                torch.testing.assert_close(got[b, t], expected, rtol=1e-5, atol=1e-6)
        layer.indices = per_token[:, 0]  # one index per row: repeated for each of its tokens
        torch.testing.assert_close(layer(x), layer.base_layer(x) + lora_loop(
            x.reshape(10, 32), layer.A, layer.B, per_token[:, 0].repeat_interleave(5), layer.scaling).view(2, 5, 96))
        layer.indices = per_token[:, :3]
        with pytest.raises(ValueError, match="one adapter index per row"):
            layer(x)
    layer.indices = None


@pytest.mark.parametrize("kernel", KERNELS)
def test_dora_mixed_batch_equals_peft_dora_alone_on_hf_gpt2(tmp_path, kernel):
    peft = pytest.importorskip("peft")
    hf = small_hf_gpt2()
    folders = {
        "dora": trained_adapter(hf, tmp_path / "dora", ["c_attn", "c_fc"], r=4, alpha=8, seed=15, use_dora=True),
        "lora": trained_adapter(hf, tmp_path / "lora", ["c_proj"], r=2, alpha=2, seed=16),
        "dora2": trained_adapter(hf, tmp_path / "dora2", ["c_attn"], r=2, alpha=4, seed=17, use_dora=True),
    }
    assert json.loads((folders["dora"] / "adapter_config.json").read_text())["use_dora"] is True
    names = ["dora", None, "lora", "dora2", "dora"]
    idx = torch.randint(0, 50, (len(names), 10), generator=torch.Generator().manual_seed(18))
    served = MultiAdapterModel(copy.deepcopy(hf), folders, kernel=kernel).eval()
    with torch.no_grad():
        got = served(idx, names).logits
        for row, name in enumerate(names):
            if name is None:
                want = hf(input_ids=idx[row:row + 1]).logits
            else:  # PEFT's own DoRA (it refuses DoRA in mixed batches, so one adapter at a time)
                theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), folders[name]).eval()
                want = theirs(input_ids=idx[row:row + 1]).logits
            torch.testing.assert_close(got[row:row + 1], want, rtol=1e-5, atol=1e-5)
    out = served.generate(idx[:, :4], names, max_new_tokens=3, do_sample=False, pad_token_id=0)  # with a KV cache
    for row, name in enumerate(names):
        model = hf if name is None else load_adapter(copy.deepcopy(hf), folders[name]).eval()
        want = model.generate(idx[row:row + 1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row:row + 1], want)


# --- bad input named, and the kernels agreeing on the edge cases (issue 26) ---

@pytest.mark.parametrize("kernel", [gather_bmm, sgmv, lora_loop])
@pytest.mark.parametrize("change, message", [
    (lambda x, A, B, s: (x.float(), A, B, s), "A must have x's dtype and device"),
    (lambda x, A, B, s: (x, A.float(), B, s), "A must have x's dtype and device"),
    (lambda x, A, B, s: (x, A, B.float(), s), "B must have x's dtype and device"),
    (lambda x, A, B, s: (x, A, B, s.float()), "scaling must have x's dtype and device"),
])
def test_mixed_dtypes_are_refused_by_name_before_torch_sees_them(kernel, change, message):
    A, B, scaling = pool()
    x = torch.randn(3, 6, dtype=torch.float64)
    x, A, B, scaling = change(x, A, B, scaling)
    with pytest.raises(TypeError, match=message):
        kernel(x, A, B, torch.tensor([0, 1, -1]), scaling)


def test_an_empty_pool_serves_rows_without_adapters_as_zeros_in_every_kernel():
    A, B, scaling = pool(n=0)
    x = torch.randn(3, 6, dtype=torch.float64)
    none = torch.full((3,), -1, dtype=torch.long)
    for kernel in (gather_bmm, sgmv, lora_loop):
        assert torch.equal(kernel(x, A, B, none, scaling), torch.zeros(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("names", [None, "poetry", ["poetry", 3], [["poetry"], None]])
def test_adapter_names_that_are_not_a_list_of_names_are_refused_by_name(ours, names):
    base, adapters = ours
    served = MultiAdapterModel(copy.deepcopy(base), adapters)
    with pytest.raises(ValueError, match=r"adapter_names must be a list with one name \(a str, or None"):
        served(torch.zeros(2, 4, dtype=torch.long), names)


@pytest.mark.parametrize("options", [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)])
def test_hf_generate_gives_every_beam_and_returned_sequence_its_rows_adapter(tmp_path, options):
    pytest.importorskip("peft")
    hf = small_hf_gpt2()
    folders = {
        "a": trained_adapter(hf, tmp_path / "a", ["c_attn", "c_proj"], r=4, alpha=8, seed=7),
        "b": trained_adapter(hf, tmp_path / "b", ["c_fc"], r=2, alpha=2, seed=8),
    }
    names = ["b", None, "a"]
    idx = torch.randint(1, 50, (3, 4), generator=torch.Generator().manual_seed(9))
    served = MultiAdapterModel(copy.deepcopy(hf), folders).eval()
    kwargs = dict(max_new_tokens=3, pad_token_id=0, do_sample=False, **options)
    out = served.generate(idx, names, **kwargs)
    per_row = options.get("num_return_sequences", 1)
    assert out.shape[0] == 3 * per_row
    for row, name in enumerate(names):
        model = hf if name is None else load_adapter(copy.deepcopy(hf), folders[name]).eval()
        want = model.generate(idx[row:row + 1], **kwargs)
        assert torch.equal(out[row * per_row:(row + 1) * per_row], want)


def test_hf_generate_refuses_a_bad_beam_count_by_name(tmp_path):
    pytest.importorskip("transformers")
    hf = small_hf_gpt2()
    folders = {"a": trained_adapter(hf, tmp_path / "a", ["c_attn"], r=2, alpha=4, seed=7)}
    served = MultiAdapterModel(copy.deepcopy(hf), folders).eval()
    with pytest.raises(ValueError, match="num_beams must be a positive int"):
        served.generate(torch.ones(1, 3, dtype=torch.long), ["a"], max_new_tokens=2, num_beams=0)


def test_every_refusal_of_multi_adapter_model_leaves_the_base_model_unchanged(ours, tmp_path, make_gpt2):
    """Tensors, requires_grad flags, module types and modes, for each way the constructor refuses."""
    from unchanged import assert_unchanged, snapshot

    base, adapters = ours
    other = trained_adapter(make_gpt2(n_embd=16), tmp_path / "other", ["attn.c_attn"], r=2, alpha=4, seed=6)
    refusals = [
        (dict(adapters=adapters, max_rank=4), "rank above"),
        (dict(adapters={"other": other}), "another base model"),
        (dict(adapters=adapters, kernel="fast"), "kernel must be one of"),
        (dict(adapters={}), "non-empty dict"),
        (dict(adapters={**adapters, "missing": tmp_path / "nowhere"}), "not found"),
    ]
    for kwargs, message in refusals:
        model = copy.deepcopy(base).train()
        before = snapshot(model)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            MultiAdapterModel(model, **kwargs)
        assert_unchanged(model, before)
