"""What fine-tuning keeps in memory, computed and measured.

Fine-tuning holds five things in memory. Four follow from the parameter counts and the
recipe, so :func:`memory_breakdown` computes them before anything is built:

- **weights**: the model itself, 4 bytes a parameter in float32, 2 in bfloat16, about
  half a byte in NF4 (4.127 bits with double quantization);
- **lora**: the adapters, in float32;
- **gradients**: one float32 number per trained parameter;
- **optimizer**: Adam's two float32 states per trained parameter.

Full fine-tuning trains every parameter: 16 bytes each. LoRA and QLoRA train only the
adapters, so the last three shrink to the adapters' size and the weights dominate.

The fifth, the **activations** autograd saves for the backward pass, depends on the
batch, the length, the model's code and gradient checkpointing: :func:`saved_activation_bytes`
measures it on any device. :func:`llama_skeleton` gives Llama's shapes on the ``meta``
device, to count models too large to build.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from lora_edu.nf4 import bits_per_parameter
from lora_edu.plumbing import check_int
from lora_edu.qlora import QLORA_LORA

__all__ = ["LLAMA_SHAPES", "METHODS", "activation_bytes", "llama_skeleton", "memory_breakdown",
           "saved_activation_bytes"]

METHODS = ("full", "lora", "qlora")


def memory_breakdown(model: nn.Module, method: str, r: int = QLORA_LORA["r"],
                     dq_blocksize: int = 256) -> dict[str, int]:
    """Bytes of weights, LoRA parameters, gradients and Adam states to fine-tune ``model``.

    ``model`` is a plain model (its shapes are what count; a model on the ``meta`` device
    costs nothing to build). The recipes, as this book trains them:

    - ``"full"``: every parameter in float32, with a float32 gradient and two float32 Adam
      states: 16 bytes per parameter.
    - ``"lora"``: a bfloat16 base (2 bytes per parameter), float32 adapters of rank ``r`` on
      every linear layer but the output head, each with gradient and Adam states.
    - ``"qlora"``: the linear layers in NF4 with double quantization (4.127 bits), the
      other parameters in float32 (as :func:`~lora_edu.qlora.prepare_for_kbit_training`
      leaves them), adapters as in ``"lora"``.

    Activations depend on batch, length and checkpointing: measure them with
    :func:`saved_activation_bytes`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    linear = [m for name, m in model.named_modules() if type(m) is nn.Linear and not name.endswith("lm_head")]
    if not linear:
        raise ValueError("model has no nn.Linear layers besides the output head")
    n_total = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for m in linear)
    n_other = n_total - n_linear
    if method == "full":
        return {"weights": 4 * n_total, "lora": 0, "gradients": 4 * n_total, "optimizer": 8 * n_total}
    n_lora = sum(r * (m.in_features + m.out_features) for m in linear)
    if method == "lora":
        weights = 2 * n_total
    else:
        weights = round(n_linear * bits_per_parameter(64, True, dq_blocksize) / 8) + 4 * n_other
    return {"weights": weights, "lora": 4 * n_lora, "gradients": 4 * n_lora, "optimizer": 8 * n_lora}


class _SavedToken:
    """What the autograd graph holds in place of a tensor while saved_activation_bytes measures."""

    __slots__ = ("__weakref__",)


def saved_activation_bytes(model: nn.Module, *inputs, **kwargs) -> int:
    """Bytes autograd keeps for the backward pass of ``model(*inputs, **kwargs)``, weights excluded.

    Measured, not estimated: every tensor saved for backward passes through a
    ``saved_tensors_hooks`` pair, and each distinct storage that the graph still holds
    when the forward pass ends is counted once. Tensors saved by a graph that was dropped
    on the way (a norm computed with gradients, then detached) are not counted: they
    were freed. Parameters and buffers (the weights) are left out, since they are in
    memory anyway. Runs the forward pass in training mode (so checkpointing is on if
    enabled) and discards it. Pass the targets too (``saved_activation_bytes(model, x, y)``,
    or ``labels=`` for a Hugging Face model): the loss keeps the log-probabilities, often
    the largest tensor.
    """
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, torch.UntypedStorage] = {}  # held here, so no address is reused while we count
    held: list[tuple[weakref.ref, int]] = []  # (the graph's token, its storage): alive while the graph is

    def pack(t: torch.Tensor) -> _SavedToken:
        # Give the graph a token, never t itself: returning t would tie an output to its own
        # grad_fn, a reference cycle through C++ that Python's garbage collector cannot break
        # (the model's parameters would leak). The graph is discarded unused, never unpacked.
        token = _SavedToken()
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            storages[storage._cdata] = storage
            held.append((weakref.ref(token), storage._cdata))
        return token

    def unpack(_) -> torch.Tensor:
        raise RuntimeError("saved_activation_bytes measures a forward pass; its graph cannot run backward")

    was_training = model.training
    model.train()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = model(*inputs, **kwargs)
    model.train(was_training)
    alive = {key for token, key in held if token() is not None}
    del out
    return sum(storages[key].nbytes() for key in alive)


def activation_bytes(config, batch: int, length: int, method: str = "lora", r: int = 8,
                     blocks_per_checkpoint: int | None = None) -> dict[str, int]:
    """What a float32 training step of the book's GPT2 keeps for backward, from the shapes alone.

    The counts are those :func:`saved_activation_bytes` measures on a CPU (and the tests
    check it), in units of one token's width ``C`` (``n = batch · length`` tokens,
    ``H`` heads, vocabulary ``V``, 4 bytes a number):

    - **a block**: 16 nC. The block's input and the second residual stream for the two
      LayerNorms (2), the normed inputs of ``c_attn`` and ``c_fc`` (2), q, k and v (3), the
      attention's output, which ``c_proj`` reads (1), and the MLP's 4C-wide hidden layer
      before and after GELU (8); plus 4n for the norms' means and inverse deviations and nH
      for the attention's log-sum-exp. LoRA adds its rank-r middle, A·x, for each of the
      four matrices (4nr).
    - **the first block** under LoRA or QLoRA saves one nC + 2n less: its input comes from a
      frozen embedding and needs no gradient, so its first LayerNorm keeps nothing.
    - **the head**: ln_f's input, means and deviations (nC + 2n), the log-probabilities of
      the loss (nV) and the targets (8n bytes), plus a 4-byte scalar. Full fine-tuning
      also keeps lm_head's input (nC) and, for the embedding's gradient, the token ids
      (8n bytes) and the positions (8·length bytes).

    QLoRA (float32 compute) keeps what LoRA keeps. ``blocks_per_checkpoint=k`` replaces the
    blocks by one block input (nC) per run of k blocks, what is kept while the forward
    pass runs; backward recomputes one run at a time, a run's worth more at its peak.
    Returns ``{"blocks": ..., "head": ..., "total": ...}`` in bytes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    check_int(batch, "batch")
    check_int(length, "length")
    check_int(r, "r")
    check_int(blocks_per_checkpoint, "blocks_per_checkpoint", optional=True)
    n, C, H, V, L = batch * length, config.n_embd, config.n_head, config.vocab_size, config.n_layer
    block = 16 * n * C + 4 * n + n * H
    if method == "full":
        blocks = L * block
        head = (2 * n * C + 2 * n + n * V) + (2 * n + 2 * length + 2 * n) + 1
    else:
        block += 4 * n * r
        blocks = L * block - (n * C + 2 * n)
        head = (n * C + 2 * n + n * V) + 2 * n + 1
    if blocks_per_checkpoint is not None:
        blocks = -(-L // blocks_per_checkpoint) * n * C
    return {"blocks": 4 * blocks, "head": 4 * head, "total": 4 * (blocks + head)}


# ----------------------------------------------------------------------------------------
# Llama's shapes, to count models too large to build
# ----------------------------------------------------------------------------------------

# The shapes of Llama 1 (Touvron et al., 2023, Table 2; vocabulary 32,000): width, MLP
# width (SwiGLU), blocks. Attention is multi-head, so q, k, v and o are all d x d.
LLAMA_SHAPES: dict[str, tuple[int, int, int]] = {
    "7B": (4096, 11008, 32),
    "13B": (5120, 13824, 40),
    "33B": (6656, 17920, 60),
    "65B": (8192, 22016, 80),
}


def llama_skeleton(size: str, vocab_size: int = 32_000) -> nn.Module:
    """A Llama-style model's parameters on the ``meta`` device: shapes only, no memory.

    ``size`` is a key of :data:`LLAMA_SHAPES` ("7B", "13B", "33B", "65B"). The module
    names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``,
    ``mlp.gate_proj``, ...; linear layers without bias; RMSNorm weights; an untied
    ``lm_head``), so :func:`memory_breakdown` and ``add_lora`` see what they would see on
    the real model. It has no ``forward``: it is for counting, not for running.
    """
    if size not in LLAMA_SHAPES:
        raise ValueError(f"size must be one of {list(LLAMA_SHAPES)}, got {size!r}")
    check_int(vocab_size, "vocab_size")
    d, hidden, n_layer = LLAMA_SHAPES[size]
    with torch.device("meta"):
        skeleton = nn.Module()
        skeleton.model = nn.Module()
        skeleton.model.embed_tokens = nn.Embedding(vocab_size, d)
        skeleton.model.layers = nn.ModuleList(_LlamaBlock(d, hidden) for _ in range(n_layer))
        skeleton.model.norm = nn.RMSNorm(d)
        skeleton.lm_head = nn.Linear(d, vocab_size, bias=False)
    return skeleton


class _LlamaBlock(nn.Module):
    """One Llama block's parameters, under Hugging Face's names (no forward)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d, bias=False))
        self.post_attention_layernorm = nn.RMSNorm(d)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, hidden, bias=False)
        self.mlp.up_proj = nn.Linear(d, hidden, bias=False)
        self.mlp.down_proj = nn.Linear(hidden, d, bias=False)
