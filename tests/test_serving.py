"""Serving many adapters: BGMV and SGMV equal the loop, and a mixed batch equals each adapter alone."""

import copy
import json

import pytest
import torch

from hf_models import small_hf_gpt2
from lora_edu.gpt2 import GPT2, GPT2Config, generate
from lora_edu.lora import add_lora, load_adapter, lora_layers, save_adapter
from lora_edu.serving import MultiAdapterModel, bgmv, lora_loop, segments, sgmv


def pool(n=4, r_max=3, d_in=6, d_out=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r_max, d_in, generator=g, dtype=dtype)
    B = torch.randn(n, d_out, r_max, generator=g, dtype=dtype)
    scaling = torch.rand(n, generator=g, dtype=dtype) + 0.5
    return A, B, scaling


@pytest.mark.parametrize("shape", [(7, 6), (7, 3, 6)], ids=["batch", "batch-seq"])
def test_bgmv_and_sgmv_equal_the_loop(shape):
    A, B, scaling = pool()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    indices = torch.tensor([2, -1, 0, 2, 3, -1, 0])  # unsorted, repeated, with rows that use no adapter
    want = lora_loop(x, A, B, indices, scaling)
    assert want[1].abs().max() == 0 and want[0].abs().max() > 0
    torch.testing.assert_close(bgmv(x, A, B, indices, scaling), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sgmv(x, A, B, indices, scaling), want, rtol=1e-12, atol=1e-12)


def test_minus_one_is_no_adapter_not_the_last_one():
    A, B, scaling = pool()
    x = torch.randn(3, 6, dtype=torch.float64)
    indices = torch.tensor([-1, 3, -1])
    delta = bgmv(x, A, B, indices, scaling)
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
    delta = bgmv(x, A, B, torch.tensor([0, 1]), scaling)
    torch.testing.assert_close(delta[0], 0.5 * (x[0] @ a2.T) @ b2.T)
    torch.testing.assert_close(delta[1], 2.0 * (x[1] @ a4.T) @ b4.T)


@pytest.mark.parametrize("kernel", [bgmv, sgmv, lora_loop])
@pytest.mark.parametrize("change, message", [
    (lambda x, A, B, i, s: (x[:, :-1], A, B, i, s), "x must be"),
    (lambda x, A, B, i, s: (x, A, B[:, :, :-1], i, s), "B must be"),
    (lambda x, A, B, i, s: (x, A, B, i[:-1], s), "one adapter index per row"),
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

def tiny_gpt2(seed=0, n_embd=32):
    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=n_embd, dropout=0.0)).eval()


def trained_adapter(base, folder, targets, r, alpha, seed, use_rslora=False):
    model = add_lora(copy.deepcopy(base), targets, r=r, alpha=alpha, use_rslora=use_rslora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))
    save_adapter(model, folder)
    return folder


@pytest.fixture
def ours(tmp_path):
    base = tiny_gpt2()
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


@pytest.mark.parametrize("kernel", ["bgmv", "sgmv", "loop"])
def test_a_mixed_batch_equals_each_adapter_served_alone(ours, kernel):
    base, adapters = ours
    names = ["poetry", None, "code", "legal", "poetry", "code"]
    idx = torch.randint(0, 64, (len(names), 12), generator=torch.Generator().manual_seed(4))
    served = MultiAdapterModel(copy.deepcopy(base), adapters, kernel=kernel).eval()
    with torch.no_grad():
        logits = served(idx, names)
        for row, name in enumerate(names):
            want = alone(base, adapters.get(name), idx[row:row + 1])
            torch.testing.assert_close(logits[row:row + 1], want, rtol=1e-5, atol=1e-5)
    assert served.r_max == 8
    assert not any(p.requires_grad for p in served.parameters())


def test_generate_gives_each_row_its_adapters_continuation(ours):
    base, adapters = ours
    names = ["legal", None, "poetry"]
    idx = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(5))
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


def test_bad_requests_and_bad_adapters_get_clear_errors(ours, tmp_path):
    base, adapters = ours
    served = MultiAdapterModel(copy.deepcopy(base), adapters)
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"unknown adapter names \['prose'\]"):
        served(idx, ["poetry", "prose"])
    with pytest.raises(ValueError, match="one name \\(or None\\) per row, 2 rows"):
        served(idx, ["poetry"])
    with pytest.raises(ValueError, match="rank above the pool's max_rank=4"):
        MultiAdapterModel(copy.deepcopy(base), adapters, max_rank=4)
    other = trained_adapter(tiny_gpt2(n_embd=16), tmp_path / "other", ["attn.c_attn"], r=2, alpha=4, seed=6)
    with pytest.raises(ValueError, match="another base model"):
        MultiAdapterModel(copy.deepcopy(base), {"other": other})
    dora = add_lora(copy.deepcopy(base), ["attn.c_attn"], r=2, alpha=4, use_dora=True)
    save_adapter(dora, tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        MultiAdapterModel(copy.deepcopy(base), {"dora": tmp_path / "dora"})
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
