"""The one tokenisation path: chat template or plain format, BOS once, EOS last, caps, pre-tokenized pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trace_ds.data.pairs import Pair
from trace_ds.data.tokenize import (
    TokenizeConfig,
    encode_prompt,
    render_plain,
    render_prompt,
    tokenize_pair,
)
from trace_ds.io import BadRecord, TraceError


@pytest.fixture(scope="module")
def chat_tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tok(plain_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(plain_tokenizer_dir)


def text_pair(
    prompt: str = "Why is the sky blue?", chosen: str = "Because of scattering.", rejected: str = "No idea."
) -> Pair:
    return Pair("p", "text", prompt, chosen, rejected)


def test_chat_template_prompt_bos_once_and_eos_last(chat_tok) -> None:
    assert chat_tok.chat_template
    rendered = render_prompt(chat_tok, "Why is the sky blue?")
    assert rendered == "<s>User: Why is the sky blue?\nAssistant:"
    tokens = tokenize_pair(text_pair(), chat_tok, TokenizeConfig())
    assert (
        tokens.prompt_ids.count(chat_tok.bos_token_id) == 1 and tokens.prompt_ids[0] == chat_tok.bos_token_id
    )
    for response in (tokens.chosen_ids, tokens.rejected_ids):
        assert response[-1] == chat_tok.eos_token_id
        assert chat_tok.bos_token_id not in response
    assert chat_tok.decode(tokens.chosen_ids, skip_special_tokens=True) == "Because of scattering."


def test_plain_format_without_a_template(plain_tok) -> None:
    assert not plain_tok.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (
        render_prompt(plain_tok, messages)
        == "System: Be brief.\nUser: Hi\nAssistant:"
        == render_plain(messages)
    )
    ids = encode_prompt(plain_tok, "Hi")
    assert ids[0] == plain_tok.bos_token_id and ids.count(plain_tok.bos_token_id) == 1


def test_conversational_pairs_match_text_pairs(chat_tok) -> None:
    conversational = Pair(
        "c",
        "conversational",
        [{"role": "user", "content": "Why is the sky blue?"}],
        [{"role": "assistant", "content": "Because of scattering."}],
        [{"role": "assistant", "content": "No idea."}],
    )
    a = tokenize_pair(conversational, chat_tok, TokenizeConfig())
    b = tokenize_pair(text_pair(), chat_tok, TokenizeConfig())
    assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)


def test_prompt_truncation_sides_and_response_cap(chat_tok) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200))
    full = encode_prompt(chat_tok, long_prompt)
    left = tokenize_pair(
        text_pair(long_prompt), chat_tok, TokenizeConfig(max_length=64, max_prompt_length=32)
    )
    assert len(left.prompt_ids) == 32 and left.prompt_ids[0] == chat_tok.bos_token_id
    assert left.prompt_ids[1:] == full[-31:]  # left truncation keeps BOS and the end (nearest the answer)
    right = tokenize_pair(text_pair(long_prompt), chat_tok, TokenizeConfig(64, 32, "right"))
    assert right.prompt_ids == full[:32]
    long_answer = " ".join(f"token{i}" for i in range(100))
    capped = tokenize_pair(
        text_pair(long_prompt, long_answer), chat_tok, TokenizeConfig(max_length=40, max_prompt_length=32)
    )
    assert len(capped.prompt_ids) + len(capped.chosen_ids) == 40


def test_pretokenized_pairs_are_used_as_given_and_never_truncated() -> None:
    pair = Pair("t", "tokenized", [5, 6, 7], [8, 9], [10])
    tokens = tokenize_pair(pair, None, TokenizeConfig(max_length=5, max_prompt_length=3))
    assert (tokens.prompt_ids, tokens.chosen_ids, tokens.rejected_ids) == ([5, 6, 7], [8, 9], [10])
    with pytest.raises(BadRecord, match="never truncated"):
        tokenize_pair(pair, None, TokenizeConfig(max_length=4, max_prompt_length=3))
    with pytest.raises(BadRecord, match="never truncated"):
        tokenize_pair(pair, None, TokenizeConfig(max_length=10, max_prompt_length=2))


def test_a_response_with_no_token_is_a_bad_record(chat_tok) -> None:
    class DropsWhitespaceLike:
        """A tokenizer that encodes some text to nothing (as tokenizers without byte fallback do)."""

        chat_template = None
        bos_token_id, eos_token_id = chat_tok.bos_token_id, chat_tok.eos_token_id

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {
                "input_ids": [] if text == "\u200b" else chat_tok(text, add_special_tokens=False)["input_ids"]
            }

    with pytest.raises(BadRecord, match="no token besides EOS"):
        tokenize_pair(text_pair(chosen="\u200b"), DropsWhitespaceLike(), TokenizeConfig())
    assert (
        tokenize_pair(text_pair(), DropsWhitespaceLike(), TokenizeConfig()).chosen_ids[-1]
        == chat_tok.eos_token_id
    )


def test_config_is_validated_up_front() -> None:
    for kwargs in (
        {"max_length": 1},
        {"max_length": 8, "max_prompt_length": 8},
        {"prompt_truncation": "middle"},
    ):
        with pytest.raises(TraceError):
            TokenizeConfig(**kwargs)
    with pytest.raises(TraceError, match="tokenizer is needed"):
        tokenize_pair(text_pair(), None, TokenizeConfig())
