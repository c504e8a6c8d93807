import math

import pytest
import torch

from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.train import TrainConfig, evaluate, make_adamw, train

SMALL = GPT2Config(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
PATTERN = torch.tensor([1, 2, 3, 4, 5] * 200)  # perfectly predictable after one token


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be a positive int"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(grad_clip=-1.0), "grad_clip must be None or > 0"),
    (dict(min_lr_ratio=0.0), r"min_lr_ratio must be in \(0, 1\]"),
    (dict(batch_size=True), "batch_size must be a positive int"),  # a bool is not a count
    (dict(eval_every=2.5), "eval_every must be a positive int"),
    (dict(amp_dtype=torch.float32), "amp_dtype must be None, torch.bfloat16 or torch.float16"),
])
def test_train_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_learning_rate_schedule():
    config = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert config.lr_at(0) == pytest.approx(0.1)
    assert config.lr_at(9) == pytest.approx(1.0)
    assert config.lr_at(10) == pytest.approx(1.0)
    assert config.lr_at(60) == pytest.approx(0.55)
    assert config.lr_at(110) == pytest.approx(0.1)
    assert TrainConfig(lr=0.3).lr_at(57) == 0.3  # constant by default


def test_evaluate_is_the_mean_loss_over_consecutive_windows():
    model = GPT2(SMALL).eval()
    ids = torch.randint(0, 16, (50,))
    x, y = ids[:48].view(6, 8), ids[1:49].view(6, 8)
    _, want = model(x, y)
    assert evaluate(model, ids, 8, batch_size=4) == pytest.approx(want.item(), rel=1e-5)
    assert evaluate(model, ids, 8, batch_size=2, max_batches=1) == pytest.approx(model(x[:2], y[:2])[1].item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs more than block_size=8"):
        evaluate(model, ids[:8], 8)


def test_training_learns_a_pattern_and_is_reproducible():
    config = TrainConfig(steps=60, batch_size=8, block_size=8, lr=1e-2, eval_every=20, eval_batches=None)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPT2(SMALL)
        runs.append(train(model, PATTERN, PATTERN, config, progress=False))
    history = runs[0]
    assert history.step == [0, 20, 40, 60] and len(history.train_loss) == 60
    assert history.val_loss[0] > math.log(16) - 0.5
    assert history.final_val_loss < 0.3 * history.val_loss[0]  # the first token of a window is a guess
    assert runs[0].val_loss == runs[1].val_loss


def test_training_leaves_frozen_parameters_alone():
    torch.manual_seed(0)
    model = GPT2(SMALL)
    frozen = model.transformer.h[0].attn.c_attn
    frozen.requires_grad_(False)
    before = frozen.weight.clone()
    train(model, PATTERN, PATTERN, TrainConfig(steps=5, batch_size=4, block_size=8, eval_every=5), progress=False)
    assert torch.equal(frozen.weight, before)


def test_adamw_decays_matrices_only_and_needs_something_to_train():
    model = GPT2(SMALL)
    decayed, plain = make_adamw(model, 1e-3, 0.1).param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_adamw(model, 1e-3, 0.1)


# ---------------------------------------------------------------------------------------
# Mixed precision in the training loop
# ---------------------------------------------------------------------------------------

CLIP_GRAD_NORM = torch.nn.utils.clip_grad_norm_


class SpyScaler(torch.amp.GradScaler):
    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaled = 0
        SpyScaler.made.append(self)

    def scale(self, outputs):
        self.scaled += 1
        return super().scale(outputs)


def train_pattern(amp_dtype, monkeypatch):
    """30 steps on PATTERN; returns the history, the loop's GradScaler and the gradient
    norms it clipped (before clipping)."""
    norms = []

    def spy_clip(*args, **kwargs):
        norms.append(CLIP_GRAD_NORM(*args, **kwargs).item())
        return norms[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    SpyScaler.made.clear()
    torch.manual_seed(0)
    model = GPT2(SMALL)
    config = TrainConfig(steps=30, batch_size=8, block_size=8, lr=1e-2, eval_every=30, eval_batches=None, amp_dtype=amp_dtype)
    history = train(model, PATTERN, PATTERN, config, progress=False)
    (scaler,) = SpyScaler.made
    assert len(norms) == 30
    return history, scaler, norms, model


def test_bfloat16_autocast_trains_without_a_loss_scaler(monkeypatch):
    reference, _, _, _ = train_pattern(None, monkeypatch)
    history, scaler, _, model = train_pattern(torch.bfloat16, monkeypatch)
    assert not scaler.is_enabled()
    assert history.train_loss != reference.train_loss  # the forward really ran in bfloat16 ...
    assert history.train_loss[0] == pytest.approx(reference.train_loss[0], rel=1e-2)
    assert history.final_val_loss < 0.3 * history.val_loss[0]  # ... and learned the pattern
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32


def test_float16_autocast_scales_the_loss_and_unscales_before_clipping(monkeypatch):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except (RuntimeError, AssertionError) as err:
        pytest.skip(f"this PyTorch has no float16 autocast on the CPU ({err})")
    reference, _, reference_norms, _ = train_pattern(None, monkeypatch)
    history, scaler, norms, _ = train_pattern(torch.float16, monkeypatch)
    assert scaler.is_enabled() and scaler.get_scale() >= 2**15 and scaler.scaled == 30
    assert history.train_loss != reference.train_loss  # the forward ran in float16
    # The loss was multiplied by the scale (2**16 to start), yet the norms clipped are the
    # true ones: the gradients were unscaled before clipping.
    assert norms[0] == pytest.approx(reference_norms[0], rel=0.05)
    assert max(norms) < 100
    assert history.final_val_loss < 0.3 * history.val_loss[0]
    assert history.final_val_loss == pytest.approx(reference.final_val_loss, rel=0.2)
