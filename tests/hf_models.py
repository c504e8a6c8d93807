"""A small random Hugging Face GPT-2 for the tests that compare with transformers and PEFT."""

import torch


def small_hf_gpt2():
    """2 layers, n_embd 32, vocab 50, context 16, no dropout; biases made non-zero so they count."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF initialises biases to zero; a dropped bias must show
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    return model
