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
