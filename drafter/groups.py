"""Prompt groups: all rollouts of one prompt share a group id, which keys its drafting history
and its length statistics. A trainer may name the group; otherwise it is a hash of the prompt
token ids, computed here and nowhere else so that every worker and engine agrees on it."""

from __future__ import annotations

import hashlib

import numpy as np

from drafter.draft import Tokens


def prompt_group(token_ids: Tokens) -> str:
    """The default prompt group: a hash of the prompt token ids (16 hex digits)."""
    data = np.asarray(token_ids, dtype="<i8").tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def group_of(explicit: str | None, token_ids: Tokens) -> str:
    """The group a request belongs to: the one it names, else its prompt's hash."""
    return explicit or prompt_group(token_ids)
