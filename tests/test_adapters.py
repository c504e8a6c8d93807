"""lora_edu.adapters: serial bottleneck adapters start as the identity and train alone."""

import copy

import pytest
import torch
import torch.nn as nn

from lora_edu.adapters import SerialAdapter, adapter_parameters, add_serial_adapters
from lora_edu.gpt2 import GPT2, GPT2Config

SMALL = GPT2Config(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def base():
    torch.manual_seed(0)
    return GPT2(SMALL).eval()


@pytest.mark.parametrize("sublayers, per_block", [(("attn", "mlp"), 2), (("mlp",), 1)])
def test_fresh_adapters_change_nothing_and_count_their_parameters(base, sublayers, per_block):
    idx = torch.randint(0, 64, (2, 16))
    model = add_serial_adapters(copy.deepcopy(base), bottleneck=4, sublayers=sublayers)
    assert torch.equal(model(idx)[0], base(idx)[0])  # up starts at zero: the identity
    per_adapter = 2 * 32 * 4 + 4 + 32  # down and up, with biases
    assert adapter_parameters(model) == SMALL.n_layer * per_block * per_adapter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == adapter_parameters(model)


def test_only_the_adapters_learn(base):
    model = add_serial_adapters(copy.deepcopy(base), bottleneck=4).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 64, (2, 16))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # up is zero at first, so down gets its gradient only from the second step
        optimizer.zero_grad()
        model(idx, idx)[1].backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n in before if ".down." in n or ".up." in n}
    assert changed == adapters


@pytest.mark.parametrize("call, error, message", [
    (lambda m: add_serial_adapters(nn.Linear(2, 2), 4), TypeError, "model must be a lora_edu GPT2"),
    (lambda m: add_serial_adapters(m, 4, ("ffn",)), ValueError, "sublayers must be a non-empty list of names"),
    (lambda m: add_serial_adapters(m, 4, ()), ValueError, "sublayers must be a non-empty list of names"),
    (lambda m: add_serial_adapters(add_serial_adapters(m, 4), 4), ValueError, "already has fine-tuning layers: serial adapters"),
    (lambda m: add_serial_adapters(m, 0), ValueError, "bottleneck must be a positive int"),
    (lambda m: SerialAdapter(nn.Identity(), 8.0, 2), ValueError, "d must be a positive int"),
])
def test_bad_input_gets_a_clear_error(base, call, error, message):
    with pytest.raises(error, match=message):
        call(base)
