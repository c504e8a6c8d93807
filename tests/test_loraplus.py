"""lora_edu.loraplus: B at ratio * lr, A at lr, weight decay exactly where asked, any torch optimizer."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_models import small_hf_gpt2
from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora, lora_layers
from lora_edu.loraplus import create_loraplus_optimizer, loraplus_param_groups
from lora_edu.train import TrainConfig, train

SMALL = GPT2Config(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def lora_model():
    torch.manual_seed(0)
    return add_lora(GPT2(SMALL), "all-linear", r=4)


def a_and_b(model):
    layers = lora_layers(model).values()
    return [layer.lora_A.weight for layer in layers], [layer.lora_B.weight for layer in layers]


def ids(params):
    return {id(p) for p in params}


def by_name(groups):
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), names
    return {g["name"]: g for g in groups}


def assert_partition(model, groups):
    """Every trainable parameter in exactly one group; no frozen one in any."""
    held = [id(p) for g in groups for p in g["params"]]
    assert len(held) == len(set(held)), "a parameter is in two groups"
    assert set(held) == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("lr, ratio", [(1e-3, 1), (1e-3, 16), (2e-4, 2.5)])
def test_a_at_lr_and_b_at_ratio_times_lr(lr, ratio):
    model = lora_model()
    A, B = a_and_b(model)
    assert len(A) == len(B) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    groups = by_name(loraplus_param_groups(model, lr, ratio))
    assert set(groups) == {"lora_A", "lora_B"}  # nothing else is trainable
    assert ids(groups["lora_A"]["params"]) == ids(A) and len(groups["lora_A"]["params"]) == 8
    assert ids(groups["lora_B"]["params"]) == ids(B) and len(groups["lora_B"]["params"]) == 8
    assert groups["lora_A"]["lr"] == lr
    assert math.isclose(groups["lora_B"]["lr"], ratio * lr)
    assert_partition(model, groups.values())


@pytest.mark.parametrize("weight_decay", [0.0, 0, 1e-4, 0.1, 1.0])
def test_every_matrix_group_gets_exactly_the_weight_decay_asked_for(weight_decay):
    model = lora_model()
    model.transformer.wte.weight.requires_grad_(True)
    model.transformer.h[0].attn.c_attn.base_layer.weight.requires_grad_(True)
    model.transformer.ln_f.requires_grad_(True)
    groups = by_name(loraplus_param_groups(model, 1e-3, 4, weight_decay=weight_decay))
    assert set(groups) == {"lora_A", "lora_B", "other", "no_decay"}
    for name in ("lora_A", "lora_B", "other"):
        assert "weight_decay" in groups[name] and groups[name]["weight_decay"] == weight_decay, name
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_the_default_is_no_weight_decay():
    groups = loraplus_param_groups(lora_model(), 1e-3, 4)
    assert all(g["weight_decay"] == 0.0 for g in groups)


def randomize_b(model):
    with torch.no_grad():  # B starts at zero, and decay of zero shows nothing
        for B in a_and_b(model)[1]:
            B.normal_()


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_optimizer_applies_the_decay_to_a_and_b(optimizer_cls, weight_decay):
    """With zero gradients, one step only decays: p <- p * (1 - lr * weight_decay), each group at its own lr."""
    model = lora_model()
    randomize_b(model)
    lr, ratio = 0.01, 4
    A, B = a_and_b(model)
    before = {id(p): p.detach().clone() for p in A + B}
    optimizer = create_loraplus_optimizer(model, optimizer_cls, lr=lr, ratio=ratio, weight_decay=weight_decay)
    for p in A + B:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for params, group_lr in ((A, lr), (B, ratio * lr)):
        for p in params:
            torch.testing.assert_close(p.detach(), before[id(p)] * (1 - group_lr * weight_decay))
    if weight_decay:
        assert not torch.equal(A[0].detach(), before[id(A[0])])  # the decay really happened


def test_a_step_with_weight_decay_differs_from_one_without_by_the_decay():
    """Same model, same gradients: the two AdamW steps differ by exactly lr * weight_decay * p."""
    results = []
    for weight_decay in (0.0, 0.1):
        model = lora_model()
        randomize_b(model)
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, ratio=8, weight_decay=weight_decay)
        A, B = a_and_b(model)
        before = [p.detach().clone() for p in A + B]
        torch.manual_seed(1)
        _, loss = model(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)))
        loss.backward()
        optimizer.step()
        results.append((before, [p.detach().clone() for p in A + B]))
    (before, plain), (_, decayed) = results
    lrs = [1e-2] * 8 + [8e-2] * 8
    for p0, p_plain, p_decayed, lr in zip(before, plain, decayed, lrs):
        torch.testing.assert_close(p_plain - p_decayed, lr * 0.1 * p0)


def test_biases_and_layernorms_trained_by_hand_are_not_decayed():
    model = lora_model()
    block = model.transformer.h[0]
    vectors = [*block.ln_1.parameters(), *model.transformer.ln_f.parameters(), block.attn.c_attn.base_layer.bias,
               block.mlp.c_fc.base_layer.bias]
    for p in vectors:
        p.requires_grad_(True)
    groups = by_name(loraplus_param_groups(model, 3e-4, 8, weight_decay=0.1))
    assert set(groups) == {"lora_A", "lora_B", "no_decay"}
    assert ids(groups["no_decay"]["params"]) == ids(vectors)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lr"] == 3e-4
    assert groups["lora_A"]["weight_decay"] == groups["lora_B"]["weight_decay"] == 0.1
    assert_partition(model, groups.values())


@pytest.mark.parametrize("embedding_lr", [None, 1e-5])
def test_an_unfrozen_embedding_is_not_lora_and_trains_at_lr(embedding_lr):
    """embedding_lr is for LoRA-wrapped embeddings (PEFT's meaning), not for one unfrozen by
    hand, which would otherwise learn at 1e-6: as good as frozen."""
    model = lora_model()
    model.transformer.wte.weight.requires_grad_(True)  # tied to lm_head: one parameter, in one group
    kwargs = {} if embedding_lr is None else {"embedding_lr": embedding_lr}
    groups = by_name(loraplus_param_groups(model, 1e-3, 16, weight_decay=0.05, **kwargs))
    assert set(groups) == {"lora_A", "lora_B", "other"}
    assert [p is model.transformer.wte.weight for p in groups["other"]["params"]] == [True]
    assert groups["other"]["lr"] == 1e-3 and groups["other"]["weight_decay"] == 0.05
    assert_partition(model, groups.values())


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # PEFT calls it
def test_the_same_rates_as_peft_but_for_the_vectors_which_stay_at_lr():
    """Against PEFT's create_loraplus_optimizer, parameter by parameter: every matrix (A, B,
    an unfrozen embedding) gets PEFT's lr and decay; biases and norms, documented, get lr
    where PEFT gives ratio * lr."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    lr, ratio, decay = 1e-3, 16, 0.05
    theirs = peft.get_peft_model(
        small_hf_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    ours = add_lora(small_hf_gpt2(), ["c_attn"], r=4, alpha=8)
    unfrozen = ["transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
                "transformer.h.0.mlp.c_fc.bias"]
    for model, prefix in ((theirs, "base_model.model."), (ours, "")):
        named = dict(model.named_parameters())
        for name in unfrozen:
            named[prefix + name].requires_grad_(True)

    def rates(optimizer, model, rename):
        names = {id(p): rename(n) for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}

    peft_rates = rates(
        peft_loraplus(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=decay),
        theirs, lambda n: n.removeprefix("base_model.model.").replace(".default", ""),
    )
    our_rates = rates(create_loraplus_optimizer(ours, torch.optim.AdamW, lr=lr, ratio=ratio, weight_decay=decay),
                      ours, lambda n: n)
    assert set(our_rates) == set(peft_rates) and len(our_rates) == 2 * 2 + len(unfrozen)  # 2 layers' A and B
    params = dict(ours.named_parameters())
    for name, (their_lr, their_decay) in peft_rates.items():
        if params[name].dim() >= 2:
            assert our_rates[name] == (their_lr, their_decay), name
        else:
            assert our_rates[name] == (lr, 0.0) and (their_lr, their_decay) == (ratio * lr, 0.0), name
    assert peft_rates["transformer.wte.weight"] == our_rates["transformer.wte.weight"] == (lr, decay)


def test_another_trainable_matrix_trains_at_lr_with_decay():
    model = lora_model()
    weight = model.transformer.h[1].mlp.c_fc.base_layer.weight
    weight.requires_grad_(True)
    groups = by_name(loraplus_param_groups(model, 1e-3, 16, weight_decay=0.05))
    assert [p is weight for p in groups["other"]["params"]] == [True]
    assert groups["other"]["lr"] == 1e-3 and groups["other"]["weight_decay"] == 0.05


def test_frozen_parameters_are_in_no_group_and_every_trainable_one_in_exactly_one():
    model = lora_model()
    for p in (model.transformer.wpe.weight, *model.transformer.h[1].ln_2.parameters(),
              model.transformer.h[0].attn.c_proj.base_layer.weight):
        p.requires_grad_(True)
    groups = loraplus_param_groups(model, 1e-3, 4, weight_decay=0.1)
    assert_partition(model, groups)
    frozen = ids(p for p in model.parameters() if not p.requires_grad)
    assert frozen and not frozen & ids(p for g in groups for p in g["params"])
    assert all(g["params"] for g in groups)  # empty groups are left out
    torch.optim.AdamW(groups)  # which PyTorch checks too: no parameter in two groups


def test_lora_fa_a_frozen_b_trained():
    model = lora_model()
    for A in a_and_b(model)[0]:
        A.requires_grad_(False)
    groups = by_name(loraplus_param_groups(model, 1e-3, 4))
    assert set(groups) == {"lora_B"} and groups["lora_B"]["lr"] == 4e-3


@settings(max_examples=30, deadline=None)
@given(
    lr=st.floats(1e-6, 1.0),
    ratio=st.floats(1.0, 64.0),
    weight_decay=st.floats(0.0, 1.0),
)
def test_groups_follow_the_rule_for_any_settings(lr, ratio, weight_decay):
    model = add_lora(GPT2(GPT2Config(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4)), ["c_attn"], r=1)
    model.transformer.ln_f.requires_grad_(True)
    groups = by_name(loraplus_param_groups(model, lr, ratio, weight_decay))
    assert groups["lora_A"]["lr"] == lr and groups["lora_B"]["lr"] == ratio * lr
    assert groups["lora_A"]["weight_decay"] == groups["lora_B"]["weight_decay"] == weight_decay
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert_partition(model, groups.values())


def test_works_on_a_hugging_face_gpt2_with_conv1d_layers():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = add_lora(transformers.GPT2LMHeadModel(config), "all-linear", r=4)
    layers = lora_layers(model)
    assert len(layers) == 8 and all(layer.fan_in_fan_out for layer in layers.values())  # Conv1D, wrapped
    model.transformer.ln_f.requires_grad_(True)
    model.transformer.wte.weight.requires_grad_(True)
    groups = by_name(loraplus_param_groups(model, 1e-3, 8, weight_decay=0.1))
    A, B = a_and_b(model)
    assert ids(groups["lora_A"]["params"]) == ids(A) and ids(groups["lora_B"]["params"]) == ids(B)
    assert groups["lora_B"]["lr"] == 8e-3 and groups["lora_B"]["weight_decay"] == 0.1
    assert groups["other"]["params"] == [model.transformer.wte.weight]
    assert ids(groups["no_decay"]["params"]) == ids(model.transformer.ln_f.parameters())
    assert_partition(model, groups.values())
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, ratio=8, weight_decay=0.1)
    idx = torch.randint(0, 50, (2, 16))
    model(idx, labels=idx).loss.backward()
    optimizer.step()
    assert all(B.abs().sum() > 0 for B in B)  # B left zero: the step reached it


# --- create_loraplus_optimizer ---

def test_create_optimizer_passes_kwargs_through():
    model = lora_model()
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, ratio=4, weight_decay=0.01,
                                          betas=(0.8, 0.95), eps=1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = by_name(optimizer.param_groups)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups.values())
    assert groups["lora_A"]["lr"] == 1e-3 and groups["lora_B"]["lr"] == 4e-3
    assert groups["lora_A"]["weight_decay"] == groups["lora_B"]["weight_decay"] == 0.01
    assert_partition(model, groups.values())


def test_create_optimizer_works_with_sgd():
    model = lora_model()
    optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, ratio=2, momentum=0.9, nesterov=True)
    assert isinstance(optimizer, torch.optim.SGD)
    groups = by_name(optimizer.param_groups)
    assert groups["lora_A"]["lr"] == 0.1 and groups["lora_B"]["lr"] == 0.2
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in groups.values())
    idx = torch.randint(0, 50, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    assert all(B.abs().sum() > 0 for B in a_and_b(model)[1])


def test_create_optimizer_refuses_to_drop_decay_silently():
    """Rprop has no weight decay: it would ignore the groups' "weight_decay" without a word."""
    model = lora_model()
    with pytest.raises(ValueError, match="Rprop has no weight decay, so weight_decay=0.1 would be silently ignored"):
        create_loraplus_optimizer(model, torch.optim.Rprop, lr=1e-3, ratio=4, weight_decay=0.1)
    assert isinstance(create_loraplus_optimizer(model, torch.optim.Rprop, lr=1e-3, ratio=4), torch.optim.Rprop)


def test_train_keeps_the_ratio_between_groups():
    model = lora_model()
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, ratio=16, weight_decay=0.1)
    config = TrainConfig(steps=3, batch_size=2, block_size=8, lr=1e-3, min_lr_ratio=0.1, eval_every=3, eval_batches=1)
    ids_ = torch.arange(200) % 50
    history = train(model, ids_, ids_, config, optimizer=optimizer, progress=False)
    assert len(history.train_loss) == 3
    groups = by_name(optimizer.param_groups)
    last = config.lr_at(2)  # the lr of the third step: below config.lr, so the schedule did scale
    assert last < config.lr
    assert math.isclose(groups["lora_A"]["lr"], last)
    assert math.isclose(groups["lora_B"]["lr"], 16 * last)
    assert math.isclose(groups["lora_B"]["lr"] / groups["lora_A"]["lr"], 16)
    assert all(B.abs().sum() > 0 for B in a_and_b(model)[1])


# --- errors ---

@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=1e-3, ratio=0.5), r"ratio must be >= 1 \(B learns at ratio \* lr"),
    (dict(lr=1e-3, ratio=0), "ratio must be a finite number > 0"),
    (dict(lr=1e-3, ratio=math.inf), "ratio must be a finite number > 0"),
    (dict(lr=0.0, ratio=4), "lr must be a finite number > 0, got 0.0"),
    (dict(lr=-1e-3, ratio=4), "lr must be a finite number > 0"),
    (dict(lr=math.nan, ratio=4), "lr must be a finite number > 0, got nan"),
    (dict(lr=math.inf, ratio=4), "lr must be a finite number > 0"),
    (dict(lr=True, ratio=4), "lr must be a finite number > 0"),
    (dict(lr="1e-3", ratio=4), "lr must be a finite number > 0"),
    (dict(lr=1e-3, ratio=4, weight_decay=-0.1), "weight_decay must be a finite number >= 0, got -0.1"),
    (dict(lr=1e-3, ratio=4, weight_decay=math.nan), "weight_decay must be a finite number >= 0"),
    (dict(lr=1e-3, ratio=4, embedding_lr=0), "embedding_lr must be a finite number > 0"),
])
@pytest.mark.parametrize("build", ["groups", "optimizer"])
def test_bad_settings_are_refused(kwargs, message, build):
    model = lora_model()
    with pytest.raises(ValueError, match=message):
        if build == "groups":
            loraplus_param_groups(model, **kwargs)
        else:
            create_loraplus_optimizer(model, torch.optim.AdamW, **kwargs)


def test_ratio_has_no_default():
    model = lora_model()
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'ratio'"):
        loraplus_param_groups(model, 1e-3)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'ratio'"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3)


def test_a_model_without_lora_is_refused():
    with pytest.raises(ValueError, match="model has no LoRA layers; call lora_edu.lora.add_lora first"):
        loraplus_param_groups(GPT2(SMALL), 1e-3, 4)
    with pytest.raises(ValueError, match="model has no LoRA layers"):
        create_loraplus_optimizer(GPT2(SMALL), torch.optim.AdamW, lr=1e-3, ratio=4)


def test_a_model_with_all_lora_frozen_is_refused():
    model = lora_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no LoRA parameter is trainable; call mark_only_lora_trainable\(model\)"):
        loraplus_param_groups(model, 1e-3, 4)
    model.transformer.ln_f.requires_grad_(True)  # something trainable, but still no LoRA
    with pytest.raises(ValueError, match="no LoRA parameter is trainable"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, ratio=4)


def test_params_cannot_be_passed_to_create_optimizer():
    model = lora_model()
    with pytest.raises(TypeError, match="builds the parameter groups itself; do not pass params"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, ratio=4, params=model.parameters())
