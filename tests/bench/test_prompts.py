from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.prompts import (
    DEFAULT_COUNT,
    check_prompt_spec,
    code_prompts,
    encode_prompt,
    load_prompts,
    math_prompts,
    read_prompt_file,
)


def test_builtin_sets_are_deterministic_with_a_default_count() -> None:
    for name in ("math", "code"):
        first, again = load_prompts(name), load_prompts(name)
        assert first == again
        assert len(first) == DEFAULT_COUNT == 8
        assert len({p[0]["content"] for p in first}) == len(first)  # all distinct
        assert all(p[0]["role"] == "user" and len(p) == 1 for p in first)


def test_a_count_gives_a_prefix_of_the_longer_set_and_the_seed_changes_it() -> None:
    assert load_prompts("math:3") == math_prompts(8)[:3]
    assert load_prompts("code:12")[:8] == code_prompts(8)
    assert len(load_prompts("code:12")) == 12
    assert math_prompts(4, seed=1) != math_prompts(4, seed=0)
    assert load_prompts("math:4", seed=1) == math_prompts(4, seed=1)


def test_math_prompts_ask_for_reasoning_and_an_answer() -> None:
    for prompt in math_prompts(10):
        text = prompt[0]["content"]
        assert "step by step" in text
        assert "Answer: <number>" in text
        assert any(ch.isdigit() for ch in text)


def test_code_prompts_hold_a_signature_and_a_docstring() -> None:
    for prompt in code_prompts(10):
        text = prompt[0]["content"]
        assert "def " in text
        assert '"""' in text
        assert "{" not in text.split("def ", 1)[1]  # every placeholder was filled


@pytest.mark.parametrize("spec", ["math:0", "math:x", "code:", "math:100001", " "])
def test_bad_builtin_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        check_prompt_spec(spec)
    with pytest.raises(ValueError):
        load_prompts(spec)


def test_an_unknown_name_that_is_no_file_is_rejected(tmp_path: Path) -> None:
    assert check_prompt_spec(str(tmp_path / "nope.txt")) == str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts(str(tmp_path / "nope.txt"))


def test_json_lines_with_prompts_and_messages(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path.write_text(
        json.dumps({"prompt": "Hello"}) + "\n\n" + json.dumps({"messages": messages}) + "\n"
    )
    assert load_prompts(str(path)) == [[{"role": "user", "content": "Hello"}], messages]


def test_plain_text_one_prompt_per_line(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("What is 3 * 4?\n\n  Write a haiku.  \n")
    assert read_prompt_file(path) == [
        [{"role": "user", "content": "What is 3 * 4?"}],
        [{"role": "user", "content": "Write a haiku."}],
    ]


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"text": "x"}', 'expected a "prompt" or a "messages" key'),
        ('{"prompt": 3}', "prompt must be a non-empty string"),
        ('{"messages": []}', "messages must be a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "message role"),
        ('{"messages": [{"role": "user", "content": 1}]}', "message content must be a string"),
        ('{"messages": ["hi"]}', "each message must be an object"),
    ],
)
def test_a_bad_json_line_names_its_line(tmp_path: Path, second_line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + second_line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {message}"):
        load_prompts(str(path))


def test_an_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(path))


def test_encode_without_a_tokenizer_folds_bytes_into_the_vocabulary() -> None:
    messages = math_prompts(1)[0]
    ids = encode_prompt(messages, None, vocab_size=64)
    assert ids == encode_prompt(messages, None, vocab_size=64)
    assert len(ids) > len(messages[0]["content"])
    assert all(3 <= token < 64 for token in ids)
    with pytest.raises(ValueError):
        encode_prompt(messages, None, vocab_size=3)


class _ChatTokenizer:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> str:
        self.calls.append((messages, kwargs))
        return "<chat>" + messages[-1]["content"]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens  # the template already holds them
        return [len(text), 7]


def test_encode_renders_the_chat_template_with_the_assistant_turn_open() -> None:
    tokenizer = _ChatTokenizer()
    messages = [{"role": "user", "content": "hi"}]
    assert encode_prompt(messages, tokenizer, vocab_size=100) == [len("<chat>hi"), 7]
    assert tokenizer.calls == [(messages, {"add_generation_prompt": True, "tokenize": False})]
