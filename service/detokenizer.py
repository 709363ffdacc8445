"""IncrementalDetokenizer: one sample's text and stop strings, token by token, in linear time.

A sample's text is `tokenizer.decode(output_ids)`. Decoding the whole output after every token
is quadratic in its length, and decoding the new token alone is wrong: a SentencePiece decoder
drops the leading space of the first token it sees, and a byte-level token may carry only part
of a UTF-8 character. So each push decodes a short window instead (the prefix-offset /
read-offset technique): the window is the tokens of the last emitted piece (context) followed
by the tokens not emitted yet (pending). Its text, less the context's own text, is what the
pending tokens add; it is emitted, and the pending tokens become the next context, once it is
not empty and does not end in U+FFFD (an unfinished character). Context and window share their
first token, so whatever the decoder does to a first token cancels out.

The emitted pieces concatenate to the full decode for byte-level BPE (tested on SmolLM2's;
GPT-2, Llama 3 and Qwen decode alike) and SentencePiece-style tokenizers (Llama 2's decoder,
Metaspace), with special tokens skipped or kept. Two cases are bounded
instead of exact: a window whose text still ends in U+FFFD after _MAX_PENDING tokens is emitted
as it is (a real character spans at most 4 byte tokens; only a run of lone lead bytes or of
tokens that add no bytes gets there), and pending tokens that add no text at all (skipped
special tokens) are dropped from the window after _MAX_PENDING of them. A tokenizer that cleans
up spaces across tokens (clean_up_tokenization_spaces, BERT-era) or a byte-fallback run made
invalid by a later byte may decode differently as a whole; neither happens for valid text on
the tokenizers above.

Stop strings are matched as the engine does: the sample stops at the first token after which
the text so far contains one; the one matched is the first in `stop` order among those found;
the final text is cut where it starts, or kept whole with include_stop (the engine's
no_stop_trim). Only final characters are searched (never the U+FFFD of an unfinished one),
and only those that can hold a new match: what the push added and the max_stop_len - 1
characters before it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"  # what a decoder makes of an unfinished UTF-8 sequence
_MAX_PENDING = 16  # pending tokens after which the window is emitted or dropped regardless


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str | list[str]:
        """A transformers tokenizer's decode (a list of ids gives a str)."""
        ...


class IncrementalDetokenizer:
    """The text of one sample's output, fed one token at a time."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop: bool = False,
        prompt_tail: Sequence[int] = (),
    ) -> None:
        """`prompt_tail`: the prompt's last few tokens, decoded as the first context: the text
        is then what the output adds to the prompt's text (a SentencePiece output keeps the
        leading space it has after the prompt, as vLLM's text does) instead of the output's
        own decode (the engine's text; the default). It should end on a whole character."""
        if isinstance(stop, str):
            raise ValueError("stop must be a sequence of strings, not one string")
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stops = tuple(stop)
        self._include_stop = include_stop
        # Characters before a push's text that a new match may start in.
        self._overlap = max((len(s) for s in self._stops), default=1) - 1
        # The decode window: context tokens window[:read], then the pending ones.
        self._window = [int(t) for t in prompt_tail]
        self._read = len(self._window)
        self._context_text = self._decode(self._window) if self._window else ""
        # The text emitted so far, as pieces; _ends[i] is the text's length after pieces[i].
        self._pieces: list[str] = []
        self._ends: list[int] = []
        self._pending = ""  # what the pending tokens add; may end in an unfinished character
        self._tail = ""  # the emitted text's last _overlap characters (stop strings only)
        self._joined = ""  # a cache of `text`
        self._final: str | None = None  # set when the sample ended
        self._matched: str | None = None

    def push(self, token_id: int) -> str | None:
        """Feed one output token; the stop string it completed (the sample ends at this token),
        else None."""
        if self._final is not None:
            raise ValueError("the sample has ended: no more tokens")
        before = self._tail
        new, emitted = self._append(token_id)
        if not self._stops:
            return None
        # A match must end in what this push made final: search it and the tail before it.
        region = before + (new if emitted else new.rstrip(_REPLACEMENT))
        for stop in self._stops:
            at = region.find(stop)
            if at >= 0:
                start = self._length() - (len(new) if emitted else 0) - len(before) + at
                self._end(stop, start)
                return stop
        return None

    @property
    def text(self) -> str:
        """The text that is final so far, a prefix of the final text that only grows: all of
        it but an unfinished UTF-8 character at the end and, with stop strings, the longest
        tail that is the start of one (it may become one, and be cut). Once the sample ended
        (a stop string matched, or finish()): the final text."""
        if self._final is not None:
            return self._final
        if len(self._joined) != self._visible():
            self._joined += self.text_from(len(self._joined))
        return self._joined

    def text_from(self, start: int) -> str:
        """text[start:], in time proportional to its length (a stream's next piece)."""
        if self._final is not None:
            return self._final[start:]
        end = self._visible()
        if start >= end:
            return ""
        first = bisect_right(self._ends, start)
        skip = start - (self._ends[first - 1] if first else 0)
        out = "".join(self._pieces[first:]) + self._pending
        return out[skip : skip + end - start]

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the sample, if one did."""
        return self._matched

    def finish(self, stop_token: int | None = None) -> str:
        """The sample ended (length, EOS, stop token, abort): the final full text (as text,
        but nothing held back). `stop_token`: the EOS or stop token that ended it, if not
        pushed: decoded (skipped if special) but not searched for stop strings, as the engine
        checks stop tokens first. Idempotent; after a stop string matched, the same text."""
        if self._final is None:
            if stop_token is not None:
                self._append(stop_token)
            self._final = "".join(self._pieces) + self._pending
            self._release()
        return self._final

    # -- internals ----------------------------------------------------------------------

    def _append(self, token_id: int) -> tuple[str, bool]:
        """Decode the window with `token_id`: what the pending tokens add, and whether it was
        emitted (then the pending tokens became the context)."""
        window = self._window
        window.append(token_id)
        new = self._decode(window)[len(self._context_text) :]
        pending = len(window) - self._read
        if new and (new[-1] != _REPLACEMENT or pending >= _MAX_PENDING):
            self._pieces.append(new)
            self._ends.append(self._length() + len(new))
            if self._overlap:
                self._tail = (self._tail + new)[-self._overlap :]
            del window[: self._read]
            self._read = len(window)
            self._context_text = self._decode(window)
            self._pending = ""
            return new, True
        if not new and pending >= _MAX_PENDING:
            del window[self._read :]  # they add nothing, here or anywhere after
        self._pending = new
        return new, False

    def _decode(self, token_ids: list[int]) -> str:
        text = self._tokenizer.decode(token_ids, skip_special_tokens=self._skip)
        assert isinstance(text, str)  # a list of ids decodes to one string
        return text

    def _length(self) -> int:
        """The emitted text's length."""
        return self._ends[-1] if self._ends else 0

    def _visible(self) -> int:
        """len(text) while the sample runs."""
        stable = self._pending.rstrip(_REPLACEMENT)
        if not self._stops:
            return self._length() + len(stable)
        tail = (self._tail + stable)[-self._overlap :] if self._overlap else ""
        return self._length() + len(stable) - _held(tail, self._stops)

    def _end(self, stop: str, start: int) -> None:
        full = "".join(self._pieces) + self._pending
        self._final = full if self._include_stop else full[:start]
        self._matched = stop
        self._release()

    def _release(self) -> None:
        self._window = []
        self._pieces, self._ends = [], []
        self._pending = self._tail = self._joined = ""


def _held(tail: str, stops: tuple[str, ...]) -> int:
    """The length of the longest suffix of `tail` that is a proper prefix of a stop string."""
    held = 0
    for stop in stops:
        # Candidates start where stop's first character occurs, longest first.
        at = tail.find(stop[0], max(0, len(tail) - len(stop) + 1))
        while at >= 0 and len(tail) - at > held:
            if stop.startswith(tail[at:]):
                held = len(tail) - at
                break
            at = tail.find(stop[0], at + 1)
    return held
