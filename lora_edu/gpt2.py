"""A compact GPT-2, small enough to read in one sitting.

The layout follows nanoGPT, and every module is named as in the Hugging Face
checkpoint (``transformer.h.0.attn.c_attn`` ...), so loading real GPT-2 weights is
a loop over names with one transpose for the Conv1D layers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file

from lora_edu.data import ByteTokenizer
from lora_edu.plumbing import check_int, check_tensors_fit

__all__ = [
    "CONV1D_WEIGHTS",
    "GPT2",
    "GPT2Config",
    "PRESETS",
    "TINY_CHECKPOINT",
    "generate",
    "generate_text",
    "load_checkpoint",
    "load_pretrained",
    "load_tiny",
    "load_tokenizer",
    "next_token_probs",
    "parameter_table",
    "save_checkpoint",
    "state_dict_from_hf",
]


@dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2. Field names follow nanoGPT; HF's are in comments."""

    vocab_size: int = 256  # HF: vocab_size
    block_size: int = 128  # HF: n_positions, the longest context
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(getattr(self, name), name)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_preset(cls, name: str) -> GPT2Config:
        """The config of a named model: ``"tiny"`` (shipped) or a real GPT-2 size."""
        if name not in PRESETS:
            raise ValueError(
                f"unknown preset {name!r}; expected one of {sorted(PRESETS)}"
            )
        return PRESETS[name]

    @classmethod
    def from_hf_config(cls, hf: dict) -> GPT2Config:
        """Translate the fields of a Hugging Face ``config.json`` for GPT-2."""
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                block_size=hf["n_positions"],
                n_layer=hf["n_layer"],
                n_head=hf["n_head"],
                n_embd=hf["n_embd"],
                layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            )
        except KeyError as missing:
            raise ValueError(f"GPT-2 config.json lacks the field {missing}") from None


PRESETS: dict[str, GPT2Config] = {
    # The model this book ships: byte-level, 4 layers, about 0.8M parameters.
    "tiny": GPT2Config(),
    # The four released GPT-2 sizes (124M, 355M, 774M, 1.5B parameters).
    "gpt2": GPT2Config(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in HF).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 language model: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.gradient_checkpointing = False
        self._checkpoint_reentrant = False
        self._blocks_per_checkpoint = 1
        self.name_or_path: str | None = None  # where the weights came from, as Hugging Face models say
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def gradient_checkpointing_enable(self, use_reentrant: bool = False, blocks_per_checkpoint: int = 1) -> None:
        """Store only the input of each run of blocks in training; recompute the run in backward.

        With one block a run, activation memory grows with the number of blocks times one
        (B, T, C) tensor, plus one block's worth during its recomputation, at the price of
        a second forward pass. ``blocks_per_checkpoint=k`` stores one input every k blocks
        and recomputes k blocks at a time: about √L is the best balance for L blocks (Chen
        et al., 2016). ``use_reentrant=True`` is PyTorch's older variant (the one PEFT
        enables): it only computes gradients if the run's input requires grad, which a
        frozen embedding's output does not (see ``lora_edu.qlora.prepare_for_kbit_training``).
        """
        self._blocks_per_checkpoint = check_int(blocks_per_checkpoint, "blocks_per_checkpoint")
        self.gradient_checkpointing = True
        self._checkpoint_reentrant = bool(use_reentrant)

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab); with ``targets`` (B, T), also the mean cross-entropy in nats."""
        x = self.embed(idx)
        blocks = self.transformer.h
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            for block in blocks:
                x = block(x)
            return self.head(x, targets)
        k = self._blocks_per_checkpoint
        for start in range(0, len(blocks), k):
            run = nn.Sequential(*blocks[start:start + k])
            x = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=self._checkpoint_reentrant)
        return self.head(x, targets)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The first block's input (B, T, C): token plus position embeddings of ``idx`` (B, T)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        T = idx.size(1)
        if not 0 < T <= self.config.block_size:
            raise ValueError(
                f"sequence length must be in 1..{self.config.block_size} (block_size), got {T}"
            )
        pos = torch.arange(T, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """The last block's output (B, T, C) to logits, and with ``targets`` the loss, as forward returns them."""
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The sampling distribution over the last dimension of ``logits`` (..., vocab).

    softmax(logits / temperature), restricted to the ``top_k`` largest logits (ties at
    the k-th value are kept) and renormalised. Lower temperature sharpens it.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    check_int(top_k, "top_k", optional=True)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    return F.softmax(logits, dim=-1)


@torch.no_grad()
def generate(
    model: GPT2,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` continuations of ``idx`` (B, T); returns (B, T + new).

    Each step samples from :func:`next_token_probs` of the last position's logits.
    ``seed`` makes the draw reproducible.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a non-empty (batch, time) tensor, got shape {tuple(idx.shape)}")
    check_int(max_new_tokens, "max_new_tokens", minimum=0)
    next_token_probs(torch.zeros(1), temperature, top_k)  # validates both, before any work
    generator = torch.Generator(device=idx.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    was_training = model.training
    model.eval()
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        probs = next_token_probs(model(idx[:, -block_size:])[:, -1, :], temperature, top_k)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    model.train(was_training)
    return idx


def generate_text(
    model: GPT2,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    """Continue ``prompt`` with a byte-level model (vocab 256) such as the tiny GPT-2."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    tokenizer = ByteTokenizer()
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"generate_text encodes bytes (vocab 256) but the model has vocab_size={model.config.vocab_size}; "
            "encode with that model's own tokenizer and call generate()"
        )
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return tokenizer.decode(out[0].tolist())


def parameter_table(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, count) of every parameter; a tied weight appears once, under its first name."""
    return [(name, tuple(p.shape), p.numel()) for name, p in model.named_parameters()]


# ---------------------------------------------------------------------------
# Checkpoints: our own (safetensors + config in its metadata) and Hugging Face's.

PACKAGE_DIR = Path(__file__).resolve().parent
TINY_CHECKPOINT = PACKAGE_DIR / "checkpoints" / "tiny_gpt2.safetensors"

# HF GPT-2 stores these four as Conv1D, whose weight is (in, out): the transpose of nn.Linear.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def save_checkpoint(model: GPT2, path: str | os.PathLike) -> None:
    """Write the weights as safetensors, with the config in the file's metadata."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(model.config))})


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT2:
    """Load a model written by :func:`save_checkpoint` (no pickle involved)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path} has no 'config' in its metadata; was it written by save_checkpoint?")
    known = {f.name for f in fields(GPT2Config)}
    config = GPT2Config(**{k: v for k, v in json.loads(metadata["config"]).items() if k in known})
    model = GPT2(config)
    _load_state(model, load_file(str(path)), source=str(path))
    model.name_or_path = str(path)
    return model.to(device).eval()


def load_tiny(device: str | torch.device = "cpu") -> GPT2:
    """The tiny GPT-2 this package ships, pretrained on Shakespeare (see ``scripts/``)."""
    return load_checkpoint(TINY_CHECKPOINT, device)


def _load_state(model: GPT2, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, naming every missing, unexpected or misshapen tensor."""
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to wte
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    check_tensors_fit(state, expected, holder="checkpoint", failure=f"{source} does not fit a GPT2 with {model.config}")
    model.load_state_dict(state, strict=False)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and transpose a Hugging Face ``GPT2LMHeadModel`` state dict into ours.

    Drops the causal-mask buffers (``attn.bias``, ``attn.masked_bias``) some versions
    save, and the tied ``lm_head.weight``; transposes the Conv1D weights to (out, in).
    """
    out = {}
    for key, value in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue
        if not key.startswith("transformer."):
            key = "transformer." + key  # GPT2Model (no LM head) saves without the prefix
        out[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
    return out


HF_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def load_pretrained(name_or_path: str = "gpt2", device: str | torch.device = "cpu") -> GPT2:
    """Real GPT-2 weights: a hub name (``"gpt2"`` ... ``"gpt2-xl"``) or a local folder.

    A folder must hold a Hugging Face ``config.json`` and ``model.safetensors``.
    A hub name is downloaded (and cached) by ``huggingface_hub``, which needs the
    network: on Colab that just works; offline it fails with a pointer to the
    tiny model that ships with this package.

    ``model.random_weights`` is True when the folder's ``config.json`` says
    ``"lora_edu_random_weights": true`` (``scripts/save_random_gpt2.py`` writes such
    a stand-in for the GPU run, which cannot reach the Hub): a chapter then skips
    the claims that only pretrained weights satisfy. False for the Hub's models.
    """
    path = Path(name_or_path)
    if path.is_dir():
        config_file, weights_file = path / "config.json", path / "model.safetensors"
    elif name_or_path in HF_NAMES:
        config_file, weights_file = _download(name_or_path)
    else:
        raise ValueError(
            f"name_or_path must be one of {list(HF_NAMES)} or a folder with config.json and "
            f"model.safetensors, got {name_or_path!r}"
        )
    for f in (config_file, weights_file):
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f} not found; a GPT-2 folder needs config.json and model.safetensors")
    hf_config = json.loads(Path(config_file).read_text())
    config = GPT2Config.from_hf_config(hf_config)
    model = GPT2(config)
    _load_state(model, state_dict_from_hf(load_file(str(weights_file))), source=str(weights_file))
    model.name_or_path = name_or_path
    model.random_weights = hf_config.get("lora_edu_random_weights", False) is True
    return model.to(device).eval()


def _download(name: str) -> tuple[str, str]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError(
            "loading real GPT-2 needs huggingface_hub (pip install huggingface_hub); "
            "the tiny model needs nothing: lora_edu.gpt2.load_tiny()"
        ) from None
    try:
        return (
            hf_hub_download(name, "config.json"),
            hf_hub_download(name, "model.safetensors"),
        )
    except Exception as err:  # offline, hub down, or not cached with HF_HUB_OFFLINE=1
        raise RuntimeError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(err).__name__}). "
            "Are you offline? Everything in this book runs on the shipped tiny model: "
            "lora_edu.gpt2.load_tiny()."
        ) from err


def load_tokenizer(name_or_path: str = "gpt2"):
    """GPT-2's BPE tokenizer (a ``transformers`` tokenizer), for the real GPT-2 models.

    A hub name or a local folder saved with ``save_pretrained``. The tiny model reads
    bytes and needs no tokenizer file: ``lora_edu.data.ByteTokenizer``.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(
            "GPT-2's tokenizer needs transformers (pip install transformers); "
            "the tiny model needs nothing: lora_edu.data.ByteTokenizer()"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:  # offline, hub down, or a folder without tokenizer files
        raise RuntimeError(
            f"could not load the tokenizer {name_or_path!r} ({type(err).__name__}). Are you offline? "
            "The tiny model reads bytes: lora_edu.data.ByteTokenizer()."
        ) from err
