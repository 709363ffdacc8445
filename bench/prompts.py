"""Prompt sets for rollout benchmarks and traces: the project's own, so nothing is downloaded.

Two builtin sets, deterministic for a given count and seed:
    math  templated grade-school word problems (names, objects and numbers drawn from a seeded
          RNG) that ask for step-by-step reasoning and a final "Answer: <number>" line;
    code  short code-completion tasks: write a small Python function from its signature and
          docstring.
`load_prompts(spec)` takes a builtin name ("math", "code": 8 prompts), a name with a count
("math:32"), or a file: JSON lines of {"prompt": str} or {"messages": [{"role", "content"}]},
or plain text with one prompt per line. A prompt is a chat (a list of messages);
`encode_prompt` renders it through the tokenizer's chat template.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from drafter.traces import parse_json_object

if TYPE_CHECKING:  # the models module imports torch; prompts need no engine
    from service.engine.models import Tokenizer

Messages = list[dict[str, str]]

BUILTIN_SETS = ("math", "code")
DEFAULT_COUNT = 8  # prompts in a builtin set named without a count
MAX_COUNT = 100_000
_BUILTIN = re.compile(r"^(math|code)(?::(\d+))?$")
_ROLES = ("system", "user", "assistant")

# -- math ----------------------------------------------------------------------------------

_NAMES = (
    "Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara",
)  # fmt: skip
_OBJECTS = (
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells",
    "cards", "oranges", "balloons", "coins",
)  # fmt: skip
_MATH_INSTRUCTION = (
    "Solve the problem step by step, showing each calculation, then give the final answer "
    "on its own line as 'Answer: <number>'."
)


def _math_give_take(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    thing = rng.choice(_OBJECTS)
    start, more, away = rng.randint(12, 60), rng.randint(3, 25), rng.randint(2, 11)
    return (
        f"{a} has {start} {thing}. {b} gives {a} {more} more {thing}, and then {a} gives "
        f"{away} {thing} to a friend. How many {thing} does {a} have now?"
    )


def _math_shopping(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    thing = rng.choice(_OBJECTS)
    price, count = rng.randint(2, 9), rng.randint(3, 8)
    bill = next(b for b in (20, 50, 100) if b > price * count)
    return (
        f"A shop sells {thing} for ${price} each. {name} buys {count} {thing} and pays with a "
        f"${bill} bill. How much change does {name} get?"
    )


def _math_rates(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    first, days1 = rng.randint(5, 30), rng.randint(2, 7)
    second, days2 = rng.randint(5, 30), rng.randint(2, 7)
    return (
        f"{name} reads {first} pages a day for {days1} days, then {second} pages a day for "
        f"{days2} days. How many pages does {name} read in total?"
    )


def _math_groups(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    thing = rng.choice(_OBJECTS)
    boxes, per_box, extra = rng.randint(3, 12), rng.randint(4, 15), rng.randint(1, 9)
    friends = rng.choice((2, 3, 4, 5, 6))
    total = boxes * per_box + extra
    total += (friends - total % friends) % friends  # shares out evenly
    extra = total - boxes * per_box
    return (
        f"{name} has {boxes} boxes with {per_box} {thing} in each box and {extra} loose "
        f"{thing}. {name} shares all of them equally among {friends} friends. How many "
        f"{thing} does each friend get?"
    )


def _math_travel(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    speed1, hours1 = rng.randint(3, 12) * 10, rng.randint(1, 4)
    speed2, hours2 = rng.randint(3, 12) * 10, rng.randint(1, 4)
    return (
        f"{name} drives at {speed1} km per hour for {hours1} hours, then at {speed2} km per "
        f"hour for {hours2} hours. What is {name}'s average speed over the whole trip, in km "
        "per hour?"
    )


_MATH_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    _math_give_take,
    _math_shopping,
    _math_rates,
    _math_groups,
    _math_travel,
)


def math_prompts(count: int = DEFAULT_COUNT, seed: int = 0) -> list[Messages]:
    """`count` grade-school word problems, the templates taken in turn, numbers from `seed`."""
    _check_count(count)
    rng = random.Random(f"math-{seed}")
    prompts = []
    for i in range(count):
        problem = _MATH_TEMPLATES[i % len(_MATH_TEMPLATES)](rng)
        prompts.append([{"role": "user", "content": f"{problem}\n{_MATH_INSTRUCTION}"}])
    return prompts


# -- code ----------------------------------------------------------------------------------

# (signature, docstring): {n} and {word} are filled from the RNG.
_CODE_TASKS = (
    ("def is_palindrome(text: str) -> bool:", "Return True if text reads the same forwards "
     "and backwards, ignoring case and spaces."),
    ("def count_vowels(text: str) -> int:", "Return how many vowels (a, e, i, o, u) text "
     "holds, in either case."),
    ("def chunk(items: list[int], size: int) -> list[list[int]]:", "Split items into "
     "consecutive lists of `size` items; the last one may be shorter."),
    ("def sum_of_multiples(limit: int) -> int:", "Return the sum of all numbers below limit "
     "that are multiples of {n} or {m}."),
    ("def running_max(values: list[float]) -> list[float]:", "Return a list whose i-th item "
     "is the largest of values[0..i]."),
    ("def word_counts(text: str) -> dict[str, int]:", "Count how often each word occurs in "
     "text, lower-cased, splitting on whitespace."),
    ("def rotate(items: list[int], steps: int) -> list[int]:", "Rotate items {direction} by "
     "`steps` positions, wrapping around."),
    ("def fizz(n: int) -> list[str]:", "Return the numbers 1..n as strings, with multiples "
     "of {n} replaced by '{word}'."),
    ("def flatten(nested: list[list[int]]) -> list[int]:", "Concatenate the inner lists of "
     "nested into one list, keeping their order."),
    ("def second_largest(values: list[int]) -> int | None:", "Return the second largest "
     "distinct value in values, or None if there is none."),
)  # fmt: skip
_CODE_WORDS = ("Fizz", "Buzz", "Bang", "Ping", "Zap")
_CODE_INSTRUCTION = (
    "Complete this Python function. Reply with the full function in a ```python code block, "
    "then one sentence explaining how it works."
)


def code_prompts(count: int = DEFAULT_COUNT, seed: int = 0) -> list[Messages]:
    """`count` function-writing tasks in a seeded order, their small parameters from `seed`."""
    _check_count(count)
    rng = random.Random(f"code-{seed}")
    order = list(range(len(_CODE_TASKS)))
    prompts = []
    for i in range(count):
        if i % len(order) == 0:
            rng.shuffle(order)
        signature, doc = _CODE_TASKS[order[i % len(order)]]
        n, m = rng.sample(range(2, 10), 2)
        doc = doc.format(
            n=n, m=m, word=rng.choice(_CODE_WORDS), direction=rng.choice(("left", "right"))
        )
        body = f'{signature}\n    """{doc}"""\n'
        prompts.append([{"role": "user", "content": f"{_CODE_INSTRUCTION}\n\n{body}"}])
    return prompts


# -- loading -------------------------------------------------------------------------------


def load_prompts(spec: str, seed: int = 0) -> list[Messages]:
    """The prompts named by `spec` (module docstring). ValueError for an unknown name, a
    missing or empty file, or a bad line (naming it); OSError if a file cannot be read."""
    match = _BUILTIN.match(spec.strip())
    if match is not None:
        name, count = match.group(1), int(match.group(2) or DEFAULT_COUNT)
        return math_prompts(count, seed) if name == "math" else code_prompts(count, seed)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(
            f"unknown prompt set {spec!r}: expected math, code, math:N, code:N or a file"
        )
    return read_prompt_file(path)


def check_prompt_spec(spec: str) -> str:
    """`spec`, stripped, if it may name prompts: a valid builtin name, or anything else (a
    path, checked when read). ValueError for a malformed builtin name such as "math:0"."""
    text = spec.strip()
    if not text:
        raise ValueError("the prompt spec must not be empty")
    head, sep, _ = text.partition(":")
    if head in BUILTIN_SETS and sep:
        match = _BUILTIN.match(text)
        if match is None:
            raise ValueError(f"{head}:N needs a whole number N, got {spec!r}")
        _check_count(int(match.group(2)))
    return text


def read_prompt_file(path: str | Path) -> list[Messages]:
    """Prompts from a file: JSON lines if its first non-blank line is a JSON object, else
    plain text with one prompt per line. Blank lines are skipped."""
    prompts: list[Messages] = []
    with open(path, encoding="utf-8") as file:
        lines = [(number, line.strip()) for number, line in enumerate(file, start=1)]
    lines = [(number, line) for number, line in lines if line]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    as_json = lines[0][1].startswith("{")
    for number, line in lines:
        try:
            prompts.append(_parse_json_line(line) if as_json else _user(line))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    return prompts


def _parse_json_line(line: str) -> Messages:
    data = parse_json_object(line)
    if "messages" in data:
        return _check_messages(data["messages"])
    if "prompt" in data:
        prompt = data["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        return _user(prompt)
    raise ValueError('expected a "prompt" or a "messages" key')


def _check_messages(messages: object) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    checked = []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("each message must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ValueError(f"message role must be one of {', '.join(_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError("message content must be a string")
        checked.append({"role": role, "content": content})
    return checked


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def _check_count(count: int) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"a prompt set holds 1 to {MAX_COUNT} prompts, got {count}")


# -- encoding ------------------------------------------------------------------------------

_BYTE_OFFSET = 3  # below it: pad, bos and eos of the tiny-random model


def encode_prompt(messages: Messages, tokenizer: Tokenizer | None, vocab_size: int) -> list[int]:
    """Prompt token ids: the chat rendered by the tokenizer's template with the assistant turn
    opened. A model without a tokenizer (tiny-random) gets the UTF-8 bytes of a plain
    "role: content" rendering, folded into its vocabulary above the special ids."""
    if tokenizer is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
        return ids
    if vocab_size <= _BYTE_OFFSET:
        raise ValueError(f"vocab_size must be > {_BYTE_OFFSET}, got {vocab_size}")
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    span = vocab_size - _BYTE_OFFSET
    return [_BYTE_OFFSET + byte % span for byte in text.encode("utf-8")]
