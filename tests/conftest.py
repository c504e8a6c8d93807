import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the repository's tools, tested like the package


@pytest.fixture(scope="session")
def tiny():
    from lora_edu.gpt2 import load_tiny

    return load_tiny()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The HTML book, built once per session: (the build's CompletedProcess, the html folder)."""
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "--path-output", str(out),
         "--warningiserror", "--nitpick", "--keep-going"],
        capture_output=True, text=True, timeout=900,
    )
    return result, out / "_build" / "html"


# --- our GPT-2 in the shape of hf_models.small_hf_gpt2, for the LoRA, adapter-file and serving tests ---


@pytest.fixture
def make_gpt2():
    """A builder, ``make_gpt2(seed=0, n_embd=32)``: our GPT2 shaped like hf_models.small_hf_gpt2 (vocab 50,
    context 16, 2 layers, 2 heads), its weights drawn from ``seed``, in eval mode, biases made non-zero so they count."""
    from lora_edu.gpt2 import GPT2, GPT2Config

    def build(seed=0, n_embd=32):
        torch.manual_seed(seed)
        model = GPT2(GPT2Config(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=n_embd)).eval()
        with torch.no_grad():  # GPT2 initialises biases to zero; a dropped bias must show
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(std=0.1)
        return model

    return build


@pytest.fixture
def randomize_lora():
    """A function, ``randomize_lora(model_or_layer, std=0.1)``: random A and B in every LoRA layer, so B A is not zero."""
    from lora_edu.lora import lora_layers
    from lora_edu.lora_layer import LoRALinear

    def randomize(model_or_layer, std=0.1):
        layers = [model_or_layer] if isinstance(model_or_layer, LoRALinear) else lora_layers(model_or_layer).values()
        with torch.no_grad():
            for layer in layers:
                layer.lora_A.weight.normal_(std=std)
                layer.lora_B.weight.normal_(std=std)

    return randomize


@pytest.fixture(params=["ours", "hf"])
def make_either_gpt2(request, make_gpt2):
    """Each test twice: with make_gpt2, and with hf_models.small_hf_gpt2 (skipped without transformers)."""
    if request.param == "ours":
        return make_gpt2
    pytest.importorskip("transformers")
    from hf_models import small_hf_gpt2

    return small_hf_gpt2


# --- small models that several test files build alike ---


@pytest.fixture(scope="module")
def small_gpt2():
    """A seeded random GPT-2 small enough for the CPU (vocab 256, 2 layers, width 64: rows of
    64 and 256, whole NF4 blocks), in eval mode. Deepcopy it before changing it."""
    from lora_edu.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    return GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=32)).eval()


@pytest.fixture(scope="module")
def small_batch():
    """Inputs and targets for small_gpt2: two (4, 32) tensors of token ids."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)


@pytest.fixture
def ours_and_hf():
    """(a lora_edu GPT2, hf_models.small_hf_gpt2()) holding the same weights, checked to give the same logits."""
    pytest.importorskip("transformers")
    from hf_models import small_hf_gpt2

    from lora_edu.gpt2 import GPT2, GPT2Config, state_dict_from_hf

    hf = small_hf_gpt2()
    c = hf.config
    ours = GPT2(GPT2Config(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd, dropout=0.0)).eval()
    missing, unexpected = ours.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the head is tied to the embedding
    idx = torch.randint(0, c.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(input_ids=idx).logits, atol=1e-5, rtol=1e-5)
    return ours, hf
