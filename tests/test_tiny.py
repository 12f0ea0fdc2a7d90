"""Tiny tokenizer and model builders: offline round trips, special ids, chat template, determinism, tying.

conftest.py sets HF_HUB_OFFLINE=1 before anything imports huggingface_hub, so every load here is offline.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trace_ds.models.tiny import (
    BOS_ID,
    CHAT_TEMPLATE,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    adds_bos_token,
    build_tiny_llama,
    build_tiny_pair,
    default_corpus,
    tiny_llama_config,
    train_tokenizer,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Why the cat finds a question?"},
    {"role": "assistant", "content": "Because it can."},
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return default_corpus()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus, out, vocab_size=512)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_round_trip_through_auto_tokenizer(tok_dir, tok, corpus):
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(tok_dir))
    fresh = train_tokenizer(corpus, tok_dir.parent / "again", vocab_size=512)
    assert len(tok) == len(fresh) == 512
    for text in corpus[:20]:
        assert tok(text)["input_ids"] == fresh(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_special_ids_and_bos(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        UNK_ID,
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    ids = tok("User: hello")["input_ids"]
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1 and ids[-1] != EOS_ID
    assert tok("User: hello", add_special_tokens=False)["input_ids"] == ids[1:]
    assert adds_bos_token(tok)
    # special tokens written in text are recognised as single ids
    assert tok("</s>", add_special_tokens=False)["input_ids"] == [EOS_ID]


def test_chat_template(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == "<s>System: Be brief.\nUser: Why the cat finds a question?\nAssistant: Because it can.\n"
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("\nAssistant:") and text.startswith(prompt)
    ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    # {% generation %} marks exactly the completion that follows the generation prompt
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.convert_ids_to_tokens(masked)[0].startswith("▁")  # the space after "Assistant:" is in it
    assert tok.decode(masked) == "Because it can.\n"  # Llama's decoder drops one leading space
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_no_chat_template(tmp_path, corpus):
    train_tokenizer(corpus[:100], tmp_path, vocab_size=384, chat_template=False)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template is None


def test_byte_fallback_any_text(tok):
    text = "Grüße, мир! 日本語 🤖 ∑x² — tab\tand\nnewline {json: [1, 2]}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert UNK_ID not in ids
    assert tok.decode(ids) == text
    assert "<0xF0>" in tok.convert_ids_to_tokens(ids)  # the emoji went through byte pieces


def test_corpus_file_and_determinism(tmp_path, corpus):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus[:200]) + "\n", encoding="utf-8")
    train_tokenizer(path, tmp_path / "a", vocab_size=400, seed=3)
    train_tokenizer(str(path), tmp_path / "b", vocab_size=400, seed=3)
    train_tokenizer(corpus[:200], tmp_path / "c", vocab_size=400, seed=3)
    a, b, c = ((tmp_path / d / "tokenizer.json").read_bytes() for d in "abc")
    assert a == b == c


def test_small_corpus_and_too_small_vocab(tmp_path):
    tok = train_tokenizer(["hello world", "hello there"], tmp_path / "small", vocab_size=1024)
    assert 4 + 256 < len(tok) <= 1024  # fewer merges than asked for: the corpus cannot support more
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["hello world"], tmp_path / "tiny", vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty lines"):
        train_tokenizer(["", "  \n"], tmp_path / "empty")


def test_config_matches_tokenizer_ids():
    cfg = tiny_llama_config(300, num_heads=4, num_kv_heads=2)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert (cfg.vocab_size, cfg.head_dim, cfg.num_key_value_heads) == (300, 16, 2)


@pytest.mark.parametrize("tied", [False, True])
def test_model_loads_and_runs(tmp_path, tied):
    built = build_tiny_llama(tmp_path, vocab_size=320, tie_word_embeddings=tied, seed=1)
    assert (tmp_path / "model.safetensors").exists()
    saved = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in saved) == (not tied)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings is tied
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) is tied
    for name, tensor in built.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    ids = torch.tensor([[BOS_ID, 10, 11, 12], [BOS_ID, 13, 14, PAD_ID]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(ids != PAD_ID).long()).logits
    assert logits.shape == (2, 4, 320) and torch.isfinite(logits).all()


def test_model_seed_determinism(tmp_path):
    state = torch.random.get_rng_state()
    a = build_tiny_llama(tmp_path / "a", vocab_size=300, seed=7).state_dict()
    b = build_tiny_llama(tmp_path / "b", vocab_size=300, seed=7).state_dict()
    c = build_tiny_llama(tmp_path / "c", vocab_size=300, seed=8).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_build_tiny_pair(tmp_path, corpus):
    out = build_tiny_pair(tmp_path / "pair", corpus, vocab_size=512, tie_word_embeddings=True, num_layers=1)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 1
    assert model.config.pad_token_id == tok.pad_token_id and model.generation_config.pad_token_id == PAD_ID
    assert tok.model_max_length == model.config.max_position_embeddings
    ids = tok.apply_chat_template(CHAT[1:], tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 3)


def test_bf16_model(tmp_path):
    build_tiny_llama(tmp_path, vocab_size=300, dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
