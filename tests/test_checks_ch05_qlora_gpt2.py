"""Chapter 5's checkers accept the right answer and reject wrong ones with a useful sentence."""

import copy

import pytest
import torch
import torch.nn as nn

from lora_edu.checks import CheckFailed, check_fine_tuning_bytes, check_quantize_and_count, check_training_step
from lora_edu.checks.ch05_qlora_gpt2 import check_blocksize_experiment
from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.memory import memory_breakdown
from lora_edu.nf4 import NF4Linear, bits_per_parameter, dequantize_nf4, quantize_nf4


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 5.1: the memory arithmetic ---

Q = bits_per_parameter(64, double_quant=True)


def make_bytes(full=lambda nl, no, nr: 16 * (nl + no), lora=lambda nl, no, nr: 2 * (nl + no) + 16 * nr,
               qlora=lambda nl, no, nr: nl * Q / 8 + 4 * no + 16 * nr):
    """A fine_tuning_bytes, right by default; each option breaks one method."""

    def fine_tuning_bytes(n_linear, n_other, n_lora, method):
        return {"full": full, "lora": lora, "qlora": qlora}[method](n_linear, n_other, n_lora)

    return fine_tuning_bytes


def per_byte_version(n_linear, n_other, n_lora, method):  # also right: per-parameter costs, rounded like the book
    weight, grad, adam = 4, 4, 8
    if method == "full":
        return (weight + grad + adam) * (n_linear + n_other)
    trained = (weight + grad + adam) * n_lora
    if method == "lora":
        return 2 * (n_linear + n_other) + trained
    return round(n_linear * bits_per_parameter(64, double_quant=True) / 8) + 4 * n_other + trained


def if_chain(n_linear, n_other, n_lora, method):  # also right, with an int for full and lora
    if method == "qlora":
        base = n_linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + n_other * 4
    elif method == "lora":
        base = (n_linear + n_other) * 2
    else:
        return (n_linear + n_other) * 16
    return base + n_lora * 16


def raising(n_linear, n_other, n_lora, method):
    if method == "QLoRA":
        return 0
    return make_bytes()(n_linear, n_other, n_lora, method)


WRONG_BYTES = {
    "Adam with one state": (make_bytes(full=lambda nl, no, nr: 12 * (nl + no), lora=lambda nl, no, nr: 2 * (nl + no) + 12 * nr,
                                       qlora=lambda nl, no, nr: nl * Q / 8 + 4 * no + 12 * nr),
                            r"method='full', you returned .* Adam keeps two states per trained parameter"),
    "Adam with one state, adapters only": (make_bytes(lora=lambda nl, no, nr: 2 * (nl + no) + 12 * nr),
                                           r"method='lora'.* Adam keeps two states"),
    "Adam states for the frozen base": (make_bytes(lora=lambda nl, no, nr: 16 * (nl + no) + 16 * nr),
                                        r"method='lora'.* the base is frozen: it gets no gradient"),
    "gradients for the frozen base (fp32)": (make_bytes(lora=lambda nl, no, nr: 6 * (nl + no) + 16 * nr),
                                             "the base is frozen: it gets no gradient"),
    "gradients for the frozen 4-bit base": (make_bytes(qlora=lambda nl, no, nr: nl * Q / 8 + 4 * no + 4 * (nl + no) + 16 * nr),
                                            r"method='qlora'.* the base is frozen: it gets no gradient"),
    "gradients for the float32 others": (make_bytes(qlora=lambda nl, no, nr: nl * Q / 8 + 8 * no + 16 * nr),
                                         r"n_other parameters are frozen too .* no gradient"),
    "4 bits flat": (make_bytes(qlora=lambda nl, no, nr: nl * 4 / 8 + 4 * no + 16 * nr),
                    r"a 4-bit weight costs more than 4 bits: .* absmax.* 4\.1270 bits"),
    "4.5 bits": (make_bytes(qlora=lambda nl, no, nr: nl * 4.5 / 8 + 4 * no + 16 * nr), "QLoRA double-quantizes them"),
    "others quantized too": (make_bytes(qlora=lambda nl, no, nr: (nl + no) * Q / 8 + 16 * nr),
                             "only the linear layers' weights are 4-bit; the n_other parameters .* stay in float32"),
    "others in bf16": (make_bytes(qlora=lambda nl, no, nr: nl * Q / 8 + 2 * no + 16 * nr), "4 bytes each, not 2"),
    "others left out": (make_bytes(qlora=lambda nl, no, nr: nl * Q / 8 + 16 * nr), r"add 4 \* n_other"),
    "bits not divided by 8": (make_bytes(qlora=lambda nl, no, nr: nl * Q + 4 * no + 16 * nr),
                              "bits_per_parameter is in bits: divide by 8 for bytes"),
    "LoRA at 2 bytes": (make_bytes(lora=lambda nl, no, nr: 2 * (nl + no) + 2 * nr),
                        r"method='lora'.* each adapter parameter is trained in float32: .* 16 bytes, not 2"),
    "LoRA at 2 bytes in qlora": (make_bytes(qlora=lambda nl, no, nr: nl * Q / 8 + 4 * no + 2 * nr),
                                 r"method='qlora'.* 16 bytes, not 2"),
    "LoRA weights in bf16": (make_bytes(lora=lambda nl, no, nr: 2 * (nl + no) + 14 * nr), "the adapters are float32, not bfloat16"),
    "LoRA weights only": (make_bytes(lora=lambda nl, no, nr: 2 * (nl + no) + 4 * nr), "you counted only their weights"),
    "no adapters": (make_bytes(lora=lambda nl, no, nr: 2 * (nl + no)), "the adapters are missing"),
    "fp32 base for lora": (make_bytes(lora=lambda nl, no, nr: 4 * (nl + no) + 16 * nr),
                           "LoRA's frozen base costs 2 bytes per parameter, its bfloat16 weights and nothing else"),
    "full with adapters": (make_bytes(full=lambda nl, no, nr: 16 * (nl + no + nr)), "has no adapters: leave n_lora out"),
    "full weights only": (make_bytes(full=lambda nl, no, nr: 4 * (nl + no)), "that is the weights only"),
    "full without others": (make_bytes(full=lambda nl, no, nr: 16 * nl), r"n_other too: 16 \* \(n_linear \+ n_other\)"),
    "lora and qlora swapped": (make_bytes(lora=lambda nl, no, nr: nl * Q / 8 + 4 * no + 16 * nr,
                                          qlora=lambda nl, no, nr: 2 * (nl + no) + 16 * nr),
                               r"method='lora', .* that is what method='qlora' takes: check which branch handles which name"),
    "full and lora swapped": (make_bytes(full=lambda nl, no, nr: 2 * (nl + no) + 16 * nr, lora=lambda nl, no, nr: 16 * (nl + no)),
                              r"method='full', .* that is what method='lora' takes"),
    "something else": (make_bytes(qlora=lambda nl, no, nr: nl * Q / 8 + 4 * no + 16 * nr + 1000),
                       r"method='qlora', you returned 1,076,869 bytes but it takes 1,075,869: 4-bit linear weights"),
    "a string": (lambda nl, no, nr, m: f"{make_bytes()(nl, no, nr, m)} bytes", "should return a number of bytes, but it returned a str"),
    "no return": (lambda nl, no, nr, m: None, "return statement missing"),
    "capitalised names": (lambda nl, no, nr, m: {"Full": 16 * (nl + no)}[m], r"raised KeyError .* spelled in lower case"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [
    make_bytes(), per_byte_version, if_chain, lambda nl, no, nr, m: torch.tensor(float(make_bytes()(nl, no, nr, m))),
])
def test_fine_tuning_bytes_accepts(right, capsys):
    check_fine_tuning_bytes(right)
    out = capsys.readouterr().out
    assert out.startswith("Correct:") and "GiB" in out


@pytest.mark.parametrize("name", WRONG_BYTES)
def test_fine_tuning_bytes_rejects(name):
    fn, message = WRONG_BYTES[name]
    with pytest.raises(CheckFailed, match=message):
        check_fine_tuning_bytes(fn)


def test_fine_tuning_bytes_reference_is_memory_breakdown():
    """On GPT-2 124M the rules agree with memory_breakdown's totals within its rounding (half a byte)."""
    from lora_edu.checks.ch05_qlora_gpt2 import _bytes_cases, _lora_count, _reference_bytes

    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset("gpt2"))
    n_linear, n_other, n_lora = _lora_count(model, 64)
    assert (n_linear, n_other, n_lora) == (84_934_656, 39_505_152, 9_437_184)
    for method in ("full", "lora", "qlora"):
        total = sum(memory_breakdown(model, method).values())
        assert abs(_reference_bytes(n_linear, n_other, n_lora, method) - total) <= 0.5
        assert abs(make_bytes()(n_linear, n_other, n_lora, method) - total) <= 0.5
    cases = list(_bytes_cases())
    assert sum("GPT-2 124M" in case[0] for case in cases) == 2


def test_each_wrong_bytes_formula_has_its_own_hint():
    """No wrong formula in the checker's list equals the right one on all the cases (which would reject a right
    answer) and, per method, no two with different hints coincide on all of them."""
    from lora_edu.checks.ch05_qlora_gpt2 import METHODS, _bytes_cases, _bytes_variants, _close_bytes, _reference_bytes

    cases = [case[1:4] for case in _bytes_cases()]
    for method in METHODS:
        right = [_reference_bytes(*c, method) for c in cases]
        seen = {}
        for formula, hint in _bytes_variants(method):
            values = tuple(round(formula(*c)) for c in cases)
            assert not all(_close_bytes(v, r) for v, r in zip(values, right)), hint
            assert seen.setdefault(values, hint) == hint, hint


# --- Exercise 5.2: quantizing, and counting what stays in float ---

def right_quantize(model):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, NF4Linear.from_linear(module))
    return model


def quantize_model_version(model):  # also right: the package's own function
    from lora_edu.qlora import quantize_model

    return quantize_model(model)


def right_count(model):
    return sum(p.numel() for p in model.parameters())


def unique_count(model):  # also right: de-duplicating by hand
    seen = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = p.numel()
    return sum(seen.values())


def make_quantize(skip=("lm_head",), **kwargs):
    def quantize_linears(model):
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name not in skip:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, NF4Linear.from_linear(module, **kwargs))
        return model

    return quantize_linears


def new_model(model):
    return right_quantize(copy.deepcopy(model))


def children_only(model):
    for name, module in list(model.named_children()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            setattr(model, name, NF4Linear.from_linear(module))
    return model


def dotted(model):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            setattr(model, name, NF4Linear.from_linear(module))
    return model


def attention_only(model):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".attn." in name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, NF4Linear.from_linear(module))
    return model


def without_bias(model):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent_name, _, child = name.rpartition(".")
            packed, state = quantize_nf4(module.weight.detach(), 64, double_quant=True)
            setattr(model.get_submodule(parent_name), child, NF4Linear(packed, state))
    return model


def untied(model):
    right_quantize(model)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def no_return(model):
    right_quantize(model)


def half_embeddings(model):
    right_quantize(model)
    model.transformer.wpe.weight.data = model.transformer.wpe.weight.data.half()
    return model


def count_with_buffers(model):
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def count_packed_too(model):
    return sum(p.numel() for p in model.parameters()) + sum(
        m.weight_packed.numel() for m in model.modules() if isinstance(m, NF4Linear))


def count_float_tensors(model):  # parameters and buffers alike, if they are floats: the float32 absmax scales too
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())


def count_tied_twice(model):
    return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


def count_embeddings_and_norms(model):
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm)) for p in m.parameters())


def count_trainable(model):  # the NF4 biases are frozen: they go missing
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_weights_as_parameters(model):
    return right_count(model) + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))


WRONG_QUANTIZE = {
    "lm_head quantized too": ((make_quantize(skip=()), right_count), "You replaced lm_head too.*tied"),
    "double_quant=False": ((make_quantize(double_quant=False), right_count), "without double quantization .* double_quant=True"),
    "blocksize 128": ((make_quantize(blocksize=128), right_count), "in blocks of 128; use .* default blocksize, 64"),
    "bfloat16 compute": ((make_quantize(compute_dtype=torch.bfloat16), right_count), "computes in torch.bfloat16"),
    "new model": ((new_model, right_count), "You returned a new, quantized model and left the one passed in"),
    "named_children": ((children_only, right_count), r"walk model\.named_modules\(\), not named_children\(\)"),
    "dotted setattr": ((dotted, right_count), "attribute named 'transformer.h.0.attn.c_attn'"),
    "attention only": ((attention_only, right_count), r"transformer\.h\.0\.mlp\.c_fc should have become an NF4Linear but is Linear"),
    "bias dropped": ((without_bias, right_count), "lost its bias"),
    "untied": ((untied, right_count), "no longer the very tensor transformer.wte.weight"),
    "no return": ((no_return, right_count), r"returned None: end with `return model`"),
    "embeddings cast": ((half_embeddings, right_count), r"The parameter transformer\.wpe\.weight changed"),
    "buffers counted": ((right_quantize, count_with_buffers), "buffers .* not parameters: count model.parameters"),
    "packed bytes counted": ((right_quantize, count_packed_too), "buffers .* not parameters"),
    "float buffers counted": ((right_quantize, count_float_tensors), "buffers .* not parameters"),
    "tied weight twice": ((right_quantize, count_tied_twice), r"\(tied\): count it once"),
    "biases forgotten": ((right_quantize, count_embeddings_and_norms), "keep their biases as float32 parameters"),
    "trainable only": ((right_quantize, count_trainable), "count every parameter, trainable or not"),
    "4-bit weights counted": ((right_quantize, count_weights_as_parameters), "are 4-bit now and no longer parameters"),
    "count as float": ((right_quantize, lambda m: float(right_count(m))), "should return an int, but it returned a float"),
    "count off by one": ((right_quantize, lambda m: right_count(m) + 1), r"off by \+1\): count the parameters"),
    "quantize stub": ((stub, right_count), "still the stub"),
    "count stub": ((right_quantize, stub), "still the stub"),
}


@pytest.mark.parametrize("right", [(right_quantize, right_count), (quantize_model_version, unique_count),
                                   (right_quantize, lambda m: torch.tensor(right_count(m)))])
def test_quantize_and_count_accepts(right, capsys):
    check_quantize_and_count(*right)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("name", WRONG_QUANTIZE)
def test_quantize_and_count_rejects(name):
    fns, message = WRONG_QUANTIZE[name]
    with pytest.raises(CheckFailed, match=message):
        check_quantize_and_count(*fns)


def test_full_precision_count_is_what_the_quantized_model_holds():
    from lora_edu.checks.ch05_qlora_gpt2 import _COUNT_CONFIGS, _full_precision_count, _seeded_model
    from lora_edu.qlora import quantize_model

    for config in _COUNT_CONFIGS:
        model = _seeded_model(config)
        want = _full_precision_count(model)
        assert want == sum(p.numel() for p in quantize_model(copy.deepcopy(model)).parameters())
        n_float = 2 * config.n_embd * (2 * config.n_layer + 1) + 9 * config.n_embd * config.n_layer
        assert want == (config.vocab_size + config.block_size) * config.n_embd + n_float  # embeddings, norms, biases


# --- Exercise 5.3: one QLoRA training step ---

def right_step(model, optimizer, x, y):
    optimizer.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
    optimizer.step()
    return loss.item()


def model_params_step(model, optimizer, x, y):  # also right: model.zero_grad, clipping model.parameters()
    model.zero_grad(set_to_none=False)
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.3)
    optimizer.step()
    return float(loss.detach())


def zero_at_the_end(model, optimizer, x, y):  # also right: the gradients zeroed after the step instead
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 0.3)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def make_step(zero=True, clip=0.3, out=lambda loss, model, x, y: loss.item(), unfreeze=False, step_first=False):
    def training_step(model, optimizer, x, y):
        if unfreeze:
            model.requires_grad_(True)
        if zero:
            optimizer.zero_grad()
        _, loss = model(x, y)
        if step_first:
            optimizer.step()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        if not step_first:
            optimizer.step()
        return out(loss, model, x, y)

    return training_step


def loss_after(loss, model, x, y):
    with torch.no_grad():
        return model(x, y)[1].item()


def own_optimizer(model, optimizer, x, y):
    return right_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), x, y)


def clip_after_step(model, optimizer, x, y):
    optimizer.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
    return loss.item()


WRONG_STEPS = {
    "no zero_grad": (make_step(zero=False), r"After the second step, the adapters differ .* call optimizer\.zero_grad\(\) at the start"),
    "no clipping": (make_step(clip=None), r"After the first step, the adapters' gradients have norm 2\.0\d+, .* were not clipped"),
    "clip at 1.0": (make_step(clip=1.0), r"have norm 1\.0000, .* you clipped the gradient norm at 1\.0"),
    "clip after the step": (clip_after_step, r"After the first step, the adapters differ .* were not clipped"),
    "loss after the step": (make_step(out=loss_after), "that is the loss after the step, computed again"),
    "returns a tensor": (make_step(out=lambda loss, *_: loss), r"returned a tensor: return loss\.item\(\)"),
    "returns the detached tensor": (make_step(out=lambda loss, *_: loss.detach()), "returned a tensor"),
    "returns nothing": (make_step(out=lambda *_: None), "return statement missing"),
    "unfreezes the base": (make_step(unfreeze=True), r"requires grad: the base is frozen in QLoRA"),
    "step before backward": (make_step(step_first=True), r"have not changed at all: call optimizer\.step\(\), .* after loss\.backward\(\)"),
    "own optimizer": (own_optimizer, r"After the second step, the adapters differ .* with the optimizer passed in"),
    "nothing": (lambda model, optimizer, x, y: model(x, y)[1].item(), "they have not changed at all"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [right_step, model_params_step, zero_at_the_end])
def test_training_step_accepts(right, capsys):
    check_training_step(right)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("name", WRONG_STEPS)
def test_training_step_rejects(name):
    fn, message = WRONG_STEPS[name]
    with pytest.raises(CheckFailed, match=message):
        check_training_step(fn)


def test_clipping_matters_on_both_batches():
    """Each step's raw gradient norm exceeds 0.3, the first above 1 (so clipping at 1.0 shows in the gradients)
    and the second below (so it shows in the adapters): a step without clipping, or clipping at 1.0, differs."""
    from lora_edu.checks.ch05_qlora_gpt2 import _batches, _reference_step, _setup

    model, optimizer = _setup()
    norms = [_reference_step(model, optimizer, x, y)[1] for _, x, y in _batches()]
    assert norms[0] > 1.0 and 0.3 < norms[1] < 1.0, norms


def test_the_reference_model_trains_only_the_adapters():
    from lora_edu.checks.ch05_qlora_gpt2 import _qlora_model

    model = _qlora_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 8
    a, b = _qlora_model(), _qlora_model()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_checkers_leave_the_learners_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    check_quantize_and_count(right_quantize, right_count)
    check_training_step(right_step)
    assert torch.equal(torch.rand(3), expected)


# --- Exercise 5.4 (open): the round-trip error against the block size ---

SIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def nf4_diff(w, blocksize, double_quant=False):
    packed, state = quantize_nf4(w, blocksize, double_quant=double_quant)
    return dequantize_nf4(packed, state).float() - w


def right_error(w, blocksize):
    return nf4_diff(w, blocksize).pow(2).mean().item()


def experiment(error=right_error, sizes=SIZES, seed=0):
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[0, 0] = 0.3  # an outlier, as real weights have
    errors = {b: error(w, b) for b in sizes}
    ok = max(b for b in sizes if errors[b] <= 1.1 * errors[64])
    return w, errors, ok


def test_blocksize_experiment_accepts_the_right_answer(capsys):
    w, errors, ok = experiment()
    check_blocksize_experiment(right_error, w, errors, ok)
    assert "Correct: up to blocksize" in capsys.readouterr().out
    w, errors, ok = experiment(lambda w, b: torch.mean(nf4_diff(w, b) ** 2), sizes=[32, 64, 256, 4096], seed=1)
    check_blocksize_experiment(lambda w, b: torch.mean(nf4_diff(w, b) ** 2), w, errors, ok)  # a 0-d tensor is fine


WRONG_ERRORS = {
    "mean absolute": (lambda w, b: nf4_diff(w, b).abs().mean().item(), "mean absolute error"),
    "root": (lambda w, b: nf4_diff(w, b).pow(2).mean().sqrt().item(), "root of the mean squared error"),
    "sum": (lambda w, b: nf4_diff(w, b).pow(2).sum().item(), "a sum over all the weights"),
    "double quant": (lambda w, b: nf4_diff(w, b, True).pow(2).mean().item(), "you used double quantization"),
    "compared with itself": (lambda w, b: 0.0, "compare the weight with itself"),
    "something else": (lambda w, b: 2 * right_error(w, b), "average the squared differences"),
    "a string": (lambda w, b: "small", "should return a Python float"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("name", WRONG_ERRORS)
def test_blocksize_experiment_rejects_a_wrong_measure(name):
    fn, message = WRONG_ERRORS[name]
    w, errors, ok = experiment()
    with pytest.raises(CheckFailed, match=message):
        check_blocksize_experiment(fn, w, errors, ok)


def test_blocksize_experiment_rejects_wrong_measurements_and_conclusions():
    w, errors, ok = experiment()
    with pytest.raises(CheckFailed, match="no entry for blocksize 64"):
        check_blocksize_experiment(right_error, w, {b: e for b, e in errors.items() if b != 64}, ok)
    with pytest.raises(CheckFailed, match="at least four block sizes"):
        check_blocksize_experiment(right_error, w, {b: errors[b] for b in (32, 64, 128)}, 64)
    with pytest.raises(CheckFailed, match="your weight w at blocksize 256"):
        check_blocksize_experiment(right_error, w, {**errors, 256: errors[256] / 2}, ok)
    larger = max(b for b in SIZES if errors[b] > 1.1 * errors[64])
    with pytest.raises(CheckFailed, match=r"times blocksize 64's, more than 1.1 times"):
        check_blocksize_experiment(right_error, w, errors, larger)
    with pytest.raises(CheckFailed, match="a larger block size you measured"):
        check_blocksize_experiment(right_error, w, errors, 32)
    with pytest.raises(CheckFailed, match="should be a dict"):
        check_blocksize_experiment(right_error, w, None, ok)
