"""Chapter 3's checkers accept the right answer and reject wrong ones with a useful sentence."""

import pytest
import torch

from lora_edu.checks import CheckFailed, check_loraplus_groups, check_lr_by_parameter, check_sign_descent_step
from lora_edu.lora import mark_only_lora_trainable
from lora_edu.lora_layer import LoRALinear
from lora_edu.loraplus import loraplus_param_groups


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 3.1: LoRA+'s parameter groups ---

def split(model):
    """(A matrices, B matrices, other trainable parameters), by identity."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    A, B = [layer.lora_A.weight for layer in layers], [layer.lora_B.weight for layer in layers]
    lora = {id(p) for p in A + B}
    return A, B, [p for p in model.parameters() if p.requires_grad and id(p) not in lora]


def make_groups(a_lr=lambda lr, ratio: lr, b_lr=lambda lr, ratio: ratio * lr, decay=lambda wd: wd,
                vector_decay=lambda wd: 0.0, rest_lr=lambda lr, ratio: lr, drop=(), parts=split, edit=None):
    """A loraplus_groups, right by default; each option breaks it in one way."""

    def loraplus_groups(model, lr, ratio, weight_decay):
        A, B, rest = parts(model)
        groups = [
            {"params": A, "lr": a_lr(lr, ratio), "weight_decay": decay(weight_decay)},
            {"params": B, "lr": b_lr(lr, ratio), "weight_decay": decay(weight_decay)},
            {"params": [p for p in rest if p.dim() >= 2], "lr": rest_lr(lr, ratio), "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "lr": rest_lr(lr, ratio), "weight_decay": vector_decay(weight_decay)},
        ]
        for i, key in drop:
            del groups[i][key]
        return edit(groups, model) if edit else groups

    return loraplus_groups


def by_name(model, lr, ratio, weight_decay):  # also right: the names say which matrix is which
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if "lora_A" in n], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for n, p in named if "lora_B" in n], "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": [p for n, p in named if "lora_" not in n], "lr": lr, "weight_decay": 0.0},
    ]


def one_group_per_parameter(model, lr, ratio, weight_decay):  # also right: many small groups
    A, B, rest = split(model)
    return ([{"params": [p], "lr": lr, "weight_decay": weight_decay} for p in A]
            + [{"params": [p], "lr": ratio * lr, "weight_decay": weight_decay} for p in B]
            + [{"params": [p], "lr": lr, "weight_decay": weight_decay if p.dim() >= 2 else 0.0} for p in rest])


def with_frozen(model):
    A, B, _ = split(model)
    lora = {id(p) for p in A + B}
    return A, B, [p for p in model.parameters() if id(p) not in lora]


def in_place_freeze(model, lr, ratio, weight_decay):
    mark_only_lora_trainable(model)
    return make_groups()(model, lr, ratio, weight_decay)


WRONG_GROUPS = {
    "A and B swapped": (make_groups(a_lr=lambda lr, ratio: ratio * lr, b_lr=lambda lr, ratio: lr), "A and B are swapped"),
    "ratio not applied": (make_groups(b_lr=lambda lr, ratio: lr), "the ratio is not applied"),
    "ratio on both": (make_groups(a_lr=lambda lr, ratio: ratio * lr), "A should stay at lr"),
    "divided by ratio": (make_groups(b_lr=lambda lr, ratio: lr / ratio), "you divided by ratio"),
    "other params at ratio * lr": (make_groups(rest_lr=lambda lr, ratio: ratio * lr), "neither A nor B trains at lr"),
    "no weight_decay key": (make_groups(drop=[(0, "weight_decay"), (1, "weight_decay")]),
                            "bug that silently turns weight decay off"),
    "weight decay 0": (make_groups(decay=lambda wd: 0.0), "weight decay 0: .* silently turns weight decay off"),
    "weight decay hard-coded": (make_groups(decay=lambda wd: 0.1), "gets weight decay 0.1: .* exactly the weight_decay"),
    "vectors decayed": (make_groups(vector_decay=lambda wd: wd), "LayerNorm weights are not decayed"),
    "vectors without weight_decay key": (make_groups(drop=[(3, "weight_decay")]), "would decay this vector"),
    "no lr key": (make_groups(drop=[(1, "lr")]), 'has no "lr"'),
    "lr not a number": (make_groups(b_lr=lambda lr, ratio: str(lr * ratio)), "should be a number"),
    "frozen included": (make_groups(parts=with_frozen), "included the frozen parameter"),
    "others missing": (make_groups(parts=lambda m: (*split(m)[:2], [])), r"h\.0\.ln_1\.weight is trainable but in no group: any other trainable"),
    "B missing": (make_groups(parts=lambda m: (split(m)[0], [], split(m)[2])), "lora_B.weight is trainable but in no group"),
    "a param twice": (make_groups(edit=lambda groups, model: groups + [{"params": split(model)[0][:1], "lr": 1.0,
                                                                        "weight_decay": 0.0}]), "in two groups"),
    "copies": (make_groups(parts=lambda m: tuple([p.detach() for p in ps] for ps in split(m))),
               "not one of the model's parameters"),
    "names": (lambda model, lr, ratio, wd: [{"params": [n for n, p in model.named_parameters() if p.requires_grad],
                                             "lr": lr, "weight_decay": wd}], "not their names"),
    "a single tensor": (make_groups(edit=lambda groups, model: [{**g, "params": g["params"][0]} for g in groups[:1]]),
                        "single tensor"),
    "a dict of groups": (make_groups(edit=lambda groups, model: dict(enumerate(groups))), r"list\(groups\.values\(\)\)"),
    "an optimizer": (make_groups(edit=lambda groups, model: torch.optim.AdamW([g for g in groups if g["params"]])),
                     "returned an optimizer"),
    "no return": (lambda *args: None, "return statement missing"),
    "a list of lists": (make_groups(edit=lambda groups, model: [g["params"] for g in groups]), "Group 0 is a list"),
    "changes requires_grad": (in_place_freeze, "changed whether .* is trainable"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [
    make_groups(), by_name, one_group_per_parameter, lambda m, lr, ratio, wd: loraplus_param_groups(m, lr, ratio, wd),
])
def test_loraplus_groups_accepts(right, capsys):
    check_loraplus_groups(right)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("name", WRONG_GROUPS)
def test_loraplus_groups_rejects(name):
    fn, message = WRONG_GROUPS[name]
    with pytest.raises(CheckFailed, match=message):
        check_loraplus_groups(fn)


def test_loraplus_groups_checker_leaves_the_learners_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    check_loraplus_groups(make_groups())
    assert torch.equal(torch.rand(3), expected)


# --- Exercise 3.2: the learning rate of every parameter ---

def right_lrs(optimizer, model):
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters() if id(p) in lr_of}


def right_lrs_with_is(optimizer, model):
    return {n: g["lr"] for g in optimizer.param_groups for n, p in model.named_parameters()
            if any(p is q for q in g["params"])}


def lrs_with_in(optimizer, model):  # `in` falls back to ==, element by element
    return {n: g["lr"] for n, p in model.named_parameters() for g in optimizer.param_groups if p in g["params"]}


def lrs_by_value(optimizer, model):  # for each name, the first group holding an equal tensor
    result = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for g in optimizer.param_groups:
            if any(torch.equal(p, q) for q in g["params"]):
                result[n] = g["lr"]
                break
    return result


def lrs_by_value_from_groups(optimizer, model):  # for each tensor in a group, the first name holding an equal one
    result = {}
    for g in optimizer.param_groups:
        for q in g["params"]:
            name = next(n for n, p in model.named_parameters() if torch.equal(p, q))
            result[name] = g["lr"]
    return result


def every_parameter(optimizer, model):
    held = right_lrs(optimizer, model)
    return {n: held.get(n, optimizer.defaults["lr"]) for n, p in model.named_parameters()}


def group_index(optimizer, model):
    index = {id(p): k for k, g in enumerate(optimizer.param_groups) for p in g["params"]}
    return {n: index[id(p)] for n, p in model.named_parameters() if id(p) in index}


def hard_coded(optimizer, model):  # right for the first case only
    return {n: 8e-3 if "lora_B" in n else 1e-3 for n, p in model.named_parameters() if p.requires_grad}


WRONG_LRS = {
    "p in group['params']": (lrs_with_in, r"compares tensors with ==.*identity"),
    "by value, name to group": (lrs_by_value, "matched tensors by value"),
    "by value, group to name": (lrs_by_value_from_groups, "matched tensors by value"),
    "frozen included": (every_parameter, "does not hold it \\(it is frozen\\)"),
    "group index": (group_index, "the index of its group; give the group.s learning rate"),
    "defaults lr": (lambda opt, model: {n: opt.defaults["lr"] for n in right_lrs(opt, model)}, r"you gave every parameter optimizer\.defaults\['lr'\], which is only the fallback"),
    "hard-coded": (hard_coded, r"and two groups' lr changed by hand, transformer\.wpe\.weight is in a group with lr 0\.05, but you gave 0\.001"),
    "first group only": (lambda opt, model: dict(list(right_lrs(opt, model).items())[:8]), "missing from your dict"),
    "ids as keys": (lambda opt, model: {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}, "keys should be the parameter names"),
    "prefixed names": (lambda opt, model: {"model." + n: lr for n, lr in right_lrs(opt, model).items()},
                       "not a name from model.named_parameters"),
    "tensor values": (lambda opt, model: {n: torch.tensor(lr) for n, lr in right_lrs(opt, model).items()}, "maps to a Tensor"),
    "a list of pairs": (lambda opt, model: list(right_lrs(opt, model).items()), "should return a dict .* got a list"),
    "no return": (lambda opt, model: None, "return statement missing"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [right_lrs, right_lrs_with_is])
def test_lr_by_parameter_accepts(right, capsys):
    check_lr_by_parameter(right)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("name", WRONG_LRS)
def test_lr_by_parameter_rejects(name):
    fn, message = WRONG_LRS[name]
    with pytest.raises(CheckFailed, match=message):
        check_lr_by_parameter(fn)


def test_value_matching_is_wrong_on_the_checkers_models():
    """The value-matching answers fail because the models hold equal tensors in different places, not by chance."""
    from lora_edu.checks.ch03_lora_plus import _lr_cases

    wrong = [lrs_by_value(opt, model) != right_lrs(opt, model) for _, model, opt in _lr_cases()]
    assert any(wrong)
    wrong = [lrs_by_value_from_groups(opt, model) != right_lrs(opt, model) for _, model, opt in _lr_cases()]
    assert wrong[0]  # every fresh B is zero


# --- Exercise 3.3: one step of sign descent ---

def right_step(a, b, x, y, lr_a, lr_b):
    f = b * (a @ x)
    grad_a, grad_b = (f - y) * b * x, (f - y) * (a @ x)
    return a - lr_a * torch.sign(grad_a), b - lr_b * torch.sign(grad_b)


def autograd_step(a, b, x, y, lr_a, lr_b):  # also right: let autograd find the gradients
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = 0.5 * (b * (a @ x) - y) ** 2
    loss.backward()
    with torch.no_grad():
        return a - lr_a * a.grad.sign(), b - lr_b * b.grad.sign()


def adam_step(a, b, x, y, lr_a, lr_b):  # also right: Adam's first step is sign descent (up to eps)
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    optimizer = torch.optim.Adam([{"params": [a], "lr": lr_a}, {"params": [b], "lr": lr_b}], eps=1e-15)
    (0.5 * (b * (a @ x) - y) ** 2).backward()
    optimizer.step()
    return a.detach(), b.detach()


def make_step(grad_a=lambda r, a, b, x: r * b * x, grad_b=lambda r, a, b, x: r * (a @ x), sign=torch.sign,
              lrs=lambda lr_a, lr_b: (lr_a, lr_b), direction=-1):
    def sign_descent_step(a, b, x, y, lr_a, lr_b):
        r = b * (a @ x) - y
        la, lb = lrs(lr_a, lr_b)
        return a + direction * la * sign(grad_a(r, a, b, x)), b + direction * lb * sign(grad_b(r, a, b, x))

    return sign_descent_step


def in_place_a(a, b, x, y, lr_a, lr_b):
    a_new, b_new = right_step(a, b, x, y, lr_a, lr_b)
    a.copy_(a_new)
    return a, b_new


def in_place_b(a, b, x, y, lr_a, lr_b):
    f = b * (a @ x)
    grad_a, grad_b = (f - y) * b * x, (f - y) * (a @ x)
    b -= lr_b * grad_b.sign()
    return a - lr_a * grad_a.sign(), b


WRONG_STEPS = {
    "lr_a for both": (make_step(lrs=lambda lr_a, lr_b: (lr_a, lr_a)), "used lr_a for b too"),
    "lr_b for both": (make_step(lrs=lambda lr_a, lr_b: (lr_b, lr_b)), "used lr_b for a too"),
    "lrs swapped": (make_step(lrs=lambda lr_a, lr_b: (lr_b, lr_a)), "lr_a and lr_b are swapped"),
    "gradient step": (make_step(sign=lambda g: g), "plain gradient step"),
    "ascent": (make_step(direction=1), "climbed the loss"),
    "grad_a without b": (make_step(grad_a=lambda r, a, b, x: r * x), "a moved though b = 0: .* B = 0 means A gets no gradient"),
    "grad_b without a @ x": (make_step(grad_b=lambda r, a, b, x: r), r"b's gradient lost a factor.*the feature a \. x"),
    "sign(0) = 1": (make_step(sign=lambda g: torch.where(g >= 0, 1.0, -1.0).to(g.dtype)), r"sign\(0\) is 0, not 1"),
    "sign(0) = -1": (make_step(sign=lambda g: torch.where(g > 0, 1.0, -1.0).to(g.dtype)), r"sign\(0\) is 0, not -1"),
    "half steps": (make_step(lrs=lambda lr_a, lr_b: (lr_a / 2, lr_b / 2)), r"your step is wrong: derive dL/da and dL/db"),
    "a in place": (in_place_a, r"changed its argument a in place.*a\.sub_"),
    "b in place": (in_place_b, r"changed its argument b in place.*write b - lr_b \* \.\.\., not b -= "),
    "x in place": (lambda a, b, x, y, lr_a, lr_b: (right_step(a, b, x, y, lr_a, lr_b), x.zero_())[0],
                   "changed its argument x in place.*only read"),
    "order swapped": (lambda *args: right_step(*args)[::-1], r"return them in the order \(a_new, b_new\)"),
    "b as a float": (lambda *args: (right_step(*args)[0], right_step(*args)[1].item()), "b_new should be a 0-d tensor like b, but it is a float"),
    "b of shape (1,)": (lambda *args: (right_step(*args)[0], right_step(*args)[1].reshape(1)), r"b_new should be a 0-d tensor like b, but it has shape \(1,\)"),
    "a of the wrong shape": (lambda *args: (right_step(*args)[0][None], right_step(*args)[1]), r"a_new, like a, should have shape \(6,\)"),
    "one tensor": (lambda *args: torch.cat([right_step(*args)[0], right_step(*args)[1][None]]), "should return a pair .* a Tensor"),
    "no return": (lambda *args: None, "return statement missing"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [right_step, autograd_step, adam_step])
def test_sign_descent_step_accepts(right, capsys):
    check_sign_descent_step(right)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("name", WRONG_STEPS)
def test_sign_descent_step_rejects(name):
    fn, message = WRONG_STEPS[name]
    with pytest.raises(CheckFailed, match=message):
        check_sign_descent_step(fn)


def test_sign_descent_cases_include_b_zero_and_both_signs():
    from lora_edu.checks.ch03_lora_plus import _sign_cases

    bs = [b.item() for _, b, *_ in _sign_cases()]
    assert 0.0 in bs and any(b > 0 for b in bs) and any(b < 0 for b in bs)


# --- Exercise 3.4 (open): the toy's best pair of learning rates at two widths ---

def test_toy_lora_losses_is_pytorch_adam():
    """The vectorised toy takes exactly torch.optim.Adam's steps, pair by pair."""
    import math

    from lora_edu.loraplus import toy_lora_losses

    n, lrs_a, lrs_b, steps, batch = 16, [2**-6, 2**-3], [2**-4, 2**-1], 12, 4
    got = toy_lora_losses(n, lrs_a, lrs_b, steps=steps, batch_size=batch, seed=5)
    for i, lr_a in enumerate(lrs_a):
        for j, lr_b in enumerate(lrs_b):
            g = torch.Generator().manual_seed(5)
            a0 = torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n)
            u = torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n)
            t = (a0 + u) / math.sqrt(2)
            a, b = a0.clone().requires_grad_(), torch.zeros((), dtype=torch.float64, requires_grad=True)
            optimizer = torch.optim.Adam([{"params": [a], "lr": lr_a}, {"params": [b], "lr": lr_b}])
            for _ in range(steps):
                x = torch.randn(batch, n, generator=g, dtype=torch.float64)
                loss = (0.5 * (b * (x @ a) - x @ t) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            assert got[i, j].item() == pytest.approx(0.5 * ((b * a - t) ** 2).sum().item(), rel=1e-9)


def test_toy_lora_losses_rejects_bad_input():
    from lora_edu.loraplus import toy_lora_losses

    for kwargs, message in [({"n": 0}, "n must be a positive int"), ({"lrs_a": []}, "lrs_a must be a non-empty"),
                            ({"lrs_b": [-1.0]}, "lrs_b must be a finite number > 0"),
                            ({"steps": 1.5}, "steps must be a positive int")]:
        args = {"n": 8, "lrs_a": [1e-3], "lrs_b": [1e-2], **kwargs}
        with pytest.raises(ValueError, match=message):
            toy_lora_losses(**args)


@pytest.fixture(scope="module")
def toy_optima():
    """The reference sweep's best pair at each width, and every pair within the checker's slack."""
    from lora_edu.checks.ch03_lora_plus import TOY_LRS_A, TOY_LRS_B, TOY_SLACK, TOY_WIDTHS, _toy_mean_losses

    out = {}
    for n in TOY_WIDTHS:
        losses = _toy_mean_losses(n, TOY_LRS_A, TOY_LRS_B)
        i, j = divmod(int(losses.argmin()), len(TOY_LRS_B))
        far = (losses > 2 * TOY_SLACK * losses.min()).nonzero().tolist()
        out[n] = {"best": (TOY_LRS_A[i], TOY_LRS_B[j]), "far": [(TOY_LRS_A[a], TOY_LRS_B[b]) for a, b in far]}
    return out


def test_toy_best_pair_accepts_the_optimum_and_a_near_one(toy_optima, capsys):
    from lora_edu.checks.ch03_lora_plus import check_toy_best_pair

    best = {n: o["best"] for n, o in toy_optima.items()}
    check_toy_best_pair(best)
    assert capsys.readouterr().out.startswith("Correct:")
    check_toy_best_pair({n: [torch.tensor(a), b] for n, (a, b) in best.items()})  # tensors and lists are fine
    assert capsys.readouterr().out.startswith("Correct:")


def test_toy_best_pair_ratio_grows_with_width(toy_optima):
    """What the exercise is about: at the reference optimum, B's rate over A's grows with the width."""
    (a64, b64), (a1024, b1024) = toy_optima[64]["best"], toy_optima[1024]["best"]
    assert b1024 / a1024 >= 4 * b64 / a64


def test_toy_best_pair_rejects(toy_optima):
    from lora_edu.checks.ch03_lora_plus import check_toy_best_pair

    best = {n: o["best"] for n, o in toy_optima.items()}
    wrong = [
        ({64: best[64], 1024: best[1024][::-1]}, "only the other way round"),
        ({64: best[64], 1024: (best[1024][1], best[1024][1])}, "one shared rate is not enough"),
        ({64: best[64], 1024: toy_optima[1024]["far"][0]}, "more than 15% above"),
        ({64: (1e3, 1e3), 1024: best[1024]}, "diverges"),
        ({64: best[64]}, "exactly the keys 64 and 1024"),
        ({"64": best[64], "1024": best[1024]}, "as ints"),
        ({64: 8.0, 1024: best[1024]}, r"a pair \(eta_A, eta_B\)"),
        ({64: (0.0, 1e-2), 1024: best[1024]}, "eta_A should be a positive learning rate"),
        ([best[64], best[1024]], "should be a dict"),
        (None, "did you assign it"),
    ]
    for answer, message in wrong:
        with pytest.raises(CheckFailed, match=message):
            check_toy_best_pair(answer)
