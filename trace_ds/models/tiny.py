"""Tiny tokenizers and models (Llama, and every model family in :data:`FAMILIES`), built locally for tests
and the CPU demo.

Nothing here touches a model hub: the tokenizer is a sentencepiece BPE model trained on the given texts and
the model is a randomly initialised ``LlamaForCausalLM``. Both are saved as an ordinary Hugging Face folder,
so the rest of trace-ds loads them with ``AutoTokenizer`` / ``AutoModelForCausalLM`` exactly as it would a
real checkpoint.

Notes on transformers 5.x (what this module relies on):

* ``LlamaTokenizer`` is now backed by ``tokenizers`` (a ``BPE`` model with ``byte_fallback``, a
  ``Metaspace`` pre-tokenizer and no normalizer); the sentencepiece-backed "slow" class is gone.
  Loading a bare ``tokenizer.model`` needs ``protobuf``, which is not installed, so we read the trained
  sentencepiece model with ``SentencePieceProcessor`` ourselves and hand ``vocab`` + ``merges`` to
  ``LlamaTokenizer`` directly. Only ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``)
  are saved.
* ``add_bos_token`` is no longer saved in ``tokenizer_config.json``; the BOS is added by the post-processor
  stored in ``tokenizer.json``. After a reload ``tokenizer.add_bos_token`` reads ``False`` even though BOS is
  still added, so code must look at the encoded ids (see :func:`adds_bos_token`), not at that attribute.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import generate_merges

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
N_BYTE_PIECES = 256  # byte_fallback reserves one piece per byte value, <0x00> .. <0xFF>

# Plain "User: ...\nAssistant: ...\n" turns. BOS comes from the template, so it must be tokenized with
# add_special_tokens=False (apply_chat_template(tokenize=True) does that). The generation prompt
# "Assistant:" is a prefix of a rendered assistant turn ("Assistant:" + " {content}\n"), so prompt and
# completion concatenate to exactly the full rendering; {% generation %} marks the completion for
# return_assistant_tokens_mask. Jinja runs with trim_blocks/lstrip_blocks, hence the quoted '\n' literals.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant:' }}"
    "{% generation %}{{ ' ' + message['content'] + '\\n' }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _corpus_lines(texts: Iterable[str] | str | os.PathLike) -> list[str]:
    """Split the corpus into non-empty lines: sentencepiece trains on lines and skips over-long ones."""
    if isinstance(texts, (str, os.PathLike)):
        texts = [Path(texts).read_text(encoding="utf-8")]
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("train_tokenizer: the corpus has no non-empty lines")
    return lines


def _train_spm(lines: list[str], vocab_size: int, seed: int) -> bytes:
    """Train a byte-fallback BPE sentencepiece model; single thread, no sampling, so bytes are reproducible."""
    import sentencepiece as spm

    min_size = 4 + N_BYTE_PIECES + len({ch for line in lines for ch in line})
    if vocab_size < min_size:
        raise ValueError(
            f"train_tokenizer: vocab_size={vocab_size} is too small; this corpus needs at least {min_size} "
            f"(4 special + {N_BYTE_PIECES} byte pieces + one per distinct character)"
        )
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not support vocab_size merges; take fewer
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,  # as Llama
        normalization_rule_name="identity",  # the HF Llama tokenizer has no normalizer: keep them in step
        remove_extra_whitespaces=False,
        max_sentence_length=1 << 20,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        unk_piece=UNK_TOKEN,
        bos_piece=BOS_TOKEN,
        eos_piece=EOS_TOKEN,
        pad_piece=PAD_TOKEN,
        minloglevel=2,
    )
    return model.getvalue()


def _spm_to_vocab_merges(model_proto: bytes) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read pieces with SentencePieceProcessor (no protobuf needed) and rebuild the BPE merges from them."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    skip = {
        sp.id_to_piece(i)
        for i in range(sp.get_piece_size())
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
    }
    # spm BPE ids follow merge order, so ordering merges by the merged piece's id reproduces spm's encoding
    return vocab, generate_merges(vocab, skip_tokens=skip)


def train_tokenizer(
    texts: Iterable[str] | str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int = 512,
    chat_template: bool = True,
    seed: int = 0,
) -> PreTrainedTokenizerBase:
    """Train a Llama-style tokenizer on ``texts`` and save it to ``out_dir``; returns the tokenizer.

    ``texts`` is an iterable of strings, or the path (``str`` / ``Path``) of a UTF-8 corpus file. The result
    has ``<unk>``=0, ``<s>``=1 (added at the start by ``tokenizer(text)``), ``</s>``=2 and a dedicated
    ``<pad>``=3, so padding never collides with EOS in label masks. Byte fallback makes any text encodable.
    ``len(tokenizer)`` may be below ``vocab_size`` when the corpus is too small for that many merges.
    Same texts, ``vocab_size`` and ``seed`` give byte-identical ``tokenizer.json``.
    """
    vocab, merges = _spm_to_vocab_merges(_train_spm(_corpus_lines(texts), vocab_size, seed))
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def adds_bos_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer(text)`` prepends BOS; in transformers 5 ``tokenizer.add_bos_token`` is unreliable."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
    pad_token_id: int | None = PAD_ID,
    dtype: torch.dtype = torch.float32,
) -> LlamaConfig:
    """A small ``LlamaConfig`` (grouped-query attention by default) whose special ids match :func:`train_tokenizer`."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=dtype,
    )


def build_tiny_llama(
    out_dir: str | os.PathLike,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
    pad_token_id: int | None = PAD_ID,
) -> LlamaForCausalLM:
    """Randomly initialise a ``LlamaForCausalLM`` and save it (safetensors) to ``out_dir``; returns the model.

    Initialisation runs under a forked RNG seeded with ``seed``: the same seed gives identical weights and the
    caller's global torch RNG is left untouched.
    """
    config = tiny_llama_config(
        vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=dtype,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(dtype)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = bos_token_id, eos_token_id, pad_token_id
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    return model


def build_tiny_from_corpus(
    corpus: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    tokenizer_documents: int = 8000,
    seed: int = 0,
    **model_options: Any,
) -> int:
    """A tokenizer trained on the first ``tokenizer_documents`` documents of ``corpus`` (plain text, documents
    separated by blank lines) and a random tiny Llama model over it, written atomically to ``out_dir``: a
    model folder every stage takes as ``--model``. ``model_options`` go to :func:`build_tiny_llama`. Returns
    the tokenizer's size (below ``vocab_size`` when the corpus is too small for that many merges)."""
    from trace_ds.io import TraceError, atomic_folder

    path = Path(corpus)
    if not path.is_file():
        raise TraceError(f"--corpus {corpus}: no such file (plain text, documents separated by blank lines)")
    documents = [d for d in path.read_text(encoding="utf-8").split("\n\n")[:tokenizer_documents] if d.strip()]
    if not documents:
        raise TraceError(f"--corpus {corpus}: no text to train a tokenizer on")
    with atomic_folder(out_dir) as staging:
        try:
            tokenizer = train_tokenizer(documents, staging, vocab_size=vocab_size, seed=seed)
        except ValueError as err:  # a vocabulary too small for the corpus's characters: say the fix
            raise TraceError(f"--vocab-size {vocab_size}: {err}") from None
        build_tiny_llama(staging, vocab_size=len(tokenizer), seed=seed, **model_options)
        tokenizer.save_pretrained(str(staging))
    return len(tokenizer)


def build_tiny_pair(
    out_dir: str | os.PathLike,
    texts: Iterable[str] | str | os.PathLike,
    vocab_size: int = 512,
    chat_template: bool = True,
    seed: int = 0,
    **model_kwargs,
) -> Path:
    """Train a tokenizer and build a matching tiny Llama in one folder (a normal HF model folder); returns it.

    The model's vocabulary is ``len(tokenizer)`` (which can be below ``vocab_size``, see :func:`train_tokenizer`),
    its special ids are the tokenizer's, and ``model_max_length`` is set to ``max_position_embeddings``.
    ``model_kwargs`` go to :func:`build_tiny_llama`.
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, out_dir, vocab_size=vocab_size, chat_template=chat_template, seed=seed)
    tokenizer.model_max_length = model_kwargs.get("max_position_embeddings", 512)
    tokenizer.save_pretrained(out_dir)
    model_kwargs.setdefault("seed", seed)
    build_tiny_llama(
        out_dir,
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **model_kwargs,
    )
    return out_dir


# The model families trace-ds is tested on (docs/compatibility.md): transformers model types and the
# config keys that make each one small. Mistral and the Gemmas get a short sliding window (so it is
# exercised by sequences of the tests' lengths); Gemma 3 text gets one sliding and one full-attention layer.
FAMILIES: dict[str, dict[str, object]] = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {},
    "qwen3": {"tie_word_embeddings": True},  # as Qwen3-0.6B to 4B
    "gemma": {},
    "gemma2": {"sliding_window": 16},
    "gemma3_text": {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "olmo2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
    },
}  # fmt: skip
MOE_FAMILIES = ("mixtral", "qwen3_moe")


def build_tiny_family(
    out_dir: str | os.PathLike,
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    noise: float = 0.05,
    **overrides: object,
) -> torch.nn.Module:
    """A tiny random model of ``family`` (a key of :data:`FAMILIES`) built with transformers' own classes
    (``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config``), saved with ``tokenizer`` as a normal
    Hugging Face folder (safetensors, as ``save_pretrained`` writes it); returns the model.

    The vocabulary and special ids are the tokenizer's. Every parameter is then moved away from its initial
    value by ``noise`` x N(0, 1) (norm weights start at exactly 1 or 0, biases at 0: a test that mixed up
    two of them would otherwise pass). ``overrides`` go to the config. Seeded under a forked RNG.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"build_tiny_family: unknown family {family!r}; use one of {sorted(FAMILIES)}")
    settings: dict[str, object] = {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **FAMILIES[family], **overrides,
    }  # fmt: skip
    config = AutoConfig.for_model(family, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(noise * torch.randn_like(param))
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def _iter_default_corpus() -> Iterator[str]:
    """A few hundred lines of chat-shaped text: enough for a 512-piece vocabulary in well under a second."""
    subjects = ["the cat", "a robot", "my friend", "the river", "our team", "this model", "the old map"]
    verbs = ["finds", "answers", "follows", "breaks", "explains", "ignores", "repairs"]
    objects = ["a question", "the rule", "every request", "the policy", "a small box", "the long road"]
    for i, subject in enumerate(subjects):
        for j, verb in enumerate(verbs):
            for k, obj in enumerate(objects):
                n = i * 49 + j * 7 + k
                yield f"User: Why {subject} {verb} {obj}? Is {n} + {k} = {n + k}?"
                yield f"Assistant: Because {subject} always {verb} {obj}. Yes, {n} + {k} = {n + k}."


def default_corpus() -> list[str]:
    """Deterministic built-in corpus for demos and tests that need no particular text."""
    return list(_iter_default_corpus())
