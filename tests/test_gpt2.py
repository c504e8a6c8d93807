import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lora_edu.gpt2 import (
    GPT2,
    GPT2Config,
    PRESETS,
    generate,
    generate_text,
    load_checkpoint,
    load_pretrained,
    load_tokenizer,
    next_token_probs,
    parameter_table,
    save_checkpoint,
    state_dict_from_hf,
)

SMALL = GPT2Config(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


# The released sizes, as Hugging Face reports them for GPT2LMHeadModel (tied head).
@pytest.mark.parametrize(
    "name, count",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_presets_have_the_real_gpt2_sizes(name, count):
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == count


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt3'.*gpt2-medium"):
        GPT2Config.from_preset("gpt3")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive int"),
        (dict(vocab_size=2.5), "vocab_size must be a positive int"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config(**kwargs)


def test_module_names_match_the_hf_checkpoint():
    names = {name for name, _ in GPT2(SMALL).named_parameters()}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.attn.c_attn.weight",
            "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight"} <= names
    assert "lm_head.weight" not in names  # tied to wte, listed once


def test_forward_shapes_and_loss():
    model = GPT2(SMALL)
    idx, targets = torch.randint(0, 50, (3, 10)), torch.randint(0, 50, (3, 10))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 50)
    # Near uniform at init. (Targets must not be the inputs: with tied embeddings an
    # untrained model already favours repeating the current token.)
    assert abs(loss.item() - math.log(50)) < 0.1


def test_forward_refuses_bad_shapes():
    model = GPT2(SMALL)
    with pytest.raises(ValueError, match="sequence length must be in 1..16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_attention_is_causal():
    model = GPT2(SMALL).eval()
    a = torch.randint(0, 50, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 50
    assert torch.allclose(model(a)[0, :8], model(b)[0, :8], atol=1e-6)
    assert not torch.allclose(model(a)[0, 8:], model(b)[0, 8:])


def test_parameter_table_counts_every_parameter_once():
    model = GPT2(SMALL)
    table = parameter_table(model)
    assert sum(n for _, _, n in table) == sum(p.numel() for p in model.parameters())
    assert ("transformer.h.0.attn.c_attn.weight", (96, 32), 3072) in table


# --- sampling ---

def test_next_token_probs_temperature_and_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.allclose(next_token_probs(logits), torch.softmax(logits, -1))
    sharp, flat = next_token_probs(logits, 0.5), next_token_probs(logits, 2.0)
    assert sharp.max() > next_token_probs(logits).max() > flat.max()
    top2 = next_token_probs(logits, 1.0, 2)
    assert (top2 > 0).tolist() == [False, True, True, False]
    assert torch.isclose(top2.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_k=0), "top_k must be None or a positive int"),
])
def test_sampling_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        next_token_probs(torch.zeros(4), **kwargs)
    with pytest.raises(ValueError, match=message):
        generate(GPT2(SMALL), torch.zeros(1, 1, dtype=torch.long), 1, **kwargs)


def test_generate_is_reproducible_with_a_seed_and_greedy_with_top_k_1():
    model = GPT2(SMALL).eval()
    idx = torch.randint(0, 50, (2, 3))
    a = generate(model, idx, 20, seed=7)
    assert a.shape == (2, 23) and torch.equal(a[:, :3], idx)
    assert torch.equal(a, generate(model, idx, 20, seed=7))
    assert not torch.equal(a, generate(model, idx, 20, seed=8))
    greedy = generate(model, idx, 5, top_k=1, seed=1)
    step = idx
    for _ in range(5):
        step = torch.cat([step, model(step)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, step)


def test_generate_runs_past_the_block_size():
    out = generate(GPT2(SMALL), torch.zeros(1, 10, dtype=torch.long), 30, seed=0)
    assert out.shape == (1, 40)


def test_generate_text_refuses_an_empty_prompt_and_a_bpe_model(tiny):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        generate_text(tiny, "")
    with pytest.raises(ValueError, match="vocab_size=50"):
        generate_text(GPT2(SMALL), "Hello")
    text = generate_text(tiny, "ROMEO.\n", 40, seed=0)
    assert text.startswith("ROMEO.\n") and len(text.encode()) >= 40


# --- our checkpoints ---

def test_checkpoint_round_trip(tmp_path):
    model = GPT2(SMALL).eval()
    save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.config == SMALL
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(idx), loaded(idx))


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="no 'config' in its metadata"):
        load_checkpoint(tmp_path / "bare.safetensors")


# --- Hugging Face GPT-2 ---

from hf_models import small_hf_gpt2  # noqa: E402  (it imports transformers when called)

# Only these tests need transformers; the ones above run without it.
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers (Hugging Face's GPT-2)")


@needs_transformers
def test_hf_state_dict_gives_the_same_logits():
    hf = small_hf_gpt2()
    ours = GPT2(SMALL)
    result = ours.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == []  # tied to wte
    idx = torch.randint(0, 50, (2, 16))
    assert torch.allclose(ours.eval()(idx), hf(idx).logits, atol=1e-5)


@needs_transformers
def test_load_pretrained_from_a_saved_hf_folder(tmp_path):
    hf = small_hf_gpt2()
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors, as on the hub
    ours = load_pretrained(str(tmp_path))
    assert ours.config == SMALL
    idx = torch.randint(0, 50, (1, 16))
    assert torch.allclose(ours(idx), hf(idx).logits, atol=1e-5)


@needs_transformers
def test_load_pretrained_names_mismatched_shapes(tmp_path):
    small_hf_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"transformer.wte.weight: checkpoint has shape \(50, 32\), model expects \(50, 64\)"):
        load_pretrained(str(tmp_path))


@needs_transformers
def test_load_pretrained_refuses_unknown_names_and_incomplete_folders(tmp_path):
    with pytest.raises(ValueError, match="name_or_path must be one of"):
        load_pretrained("gpt5")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_pretrained(str(tmp_path))


@needs_transformers
@pytest.mark.parametrize("call, what_ships", [("load_pretrained", "load_tiny()"), ("load_tokenizer", "ByteTokenizer()")])
def test_loading_from_the_hub_offline_points_at_what_the_package_ships(tmp_path, call, what_ships):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = f"from lora_edu.gpt2 import {call}; {call}('gpt2')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Are you offline?" in result.stderr and what_ships in result.stderr


@needs_transformers
def test_load_tokenizer_reads_a_saved_folder(tmp_path):
    # A small byte-level BPE trained here stands in for GPT-2's (which needs the hub).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Of Man's first disobedience, and the fruit"] * 10, trainers.BpeTrainer(vocab_size=300))
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(tmp_path)

    tokenizer = load_tokenizer(str(tmp_path))
    ids = tokenizer.encode("the fruit of that forbidden tree")
    assert tokenizer.decode(ids) == "the fruit of that forbidden tree"
    assert len(ids) < len("the fruit of that forbidden tree")  # merges happened: it is not bytes


@needs_transformers
def test_load_tokenizer_names_a_folder_without_tokenizer_files(tmp_path):
    with pytest.raises(RuntimeError, match="could not load the tokenizer"):
        load_tokenizer(str(tmp_path))
