"""Our own forward pass for Llama-family models over a per-slot KV cache (as nano-vllm does).

One `forward` serves a ragged batch: each active slot brings its new tokens (the tokens not
yet in its cache, then its draft), of any count. Projections and MLP run once over all tokens
concatenated; attention runs each token against its own slot's cache: on a CPU in fp32 in one
native call for every short chunk that is not a tree (_kernels.attention), otherwise in padded
calls shared by chunks of a similar width (long chunks attend one slot at a time). Rolling back
rejected draft tokens is setting the slot's length back: the stale K/V beyond it is
overwritten by the next forward.

A chunk may end in a tree draft (forward's `trees`: the parents of its last tokens, -1 for a
child of the token before them). Its nodes occupy consecutive cache positions in draft order;
each attends to the cache prefix, the chunk's tokens before the tree and its own ancestors
only (the padded call's or the looped slot's boolean mask, edited on that chunk's rows), and
its rotary position is the last pre-tree token's plus its depth. keep_path then moves the
accepted path's K/V next to the pre-tree tokens. A chain (parents -1, 0, 1, ...) given as a
tree runs exactly the chain code: no mask edit, rotary positions equal cache positions.

Deterministic (batch-invariant) mode makes every token's arithmetic a function of its own
prefix alone, so its logits are bitwise the same whether it is decoded alone, verified inside
a draft chunk or batched with other slots (speculation is then lossless bitwise, not just up
to rounding). Only two kinds of operation reduce across a shape that batching changes:
- Matmuls. On a CPU in float32 they run on the native kernel (service/engine/_native), which
  computes each row of x @ W.T on its own: its bits cannot depend on the other rows. Elsewhere
  a matmul with fewer than 4 rows is padded to 4 and the rest runs as one call: MKL's sgemm on
  an AMD EPYC (Zen 1) computed a row the same way for every M >= 4 wherever it sat, with
  M = 1 (gemv) and M = 2, 3 on other kernels; on an Intel Xeon with AVX-512 it did not even
  for M >= 4 (measured), which is why the native kernel comes first. The Runner checks the
  property on the model's own weights when it is built, and refuses deterministic mode where
  it does not hold.
- Attention. A chunk attends with a causal mask over its whole span, so a query's softmax and
  its P @ V reduce over a length set by its companions, and a lone decode query is a one-row
  matmul. Here a query at position p attends over the key block [0, 32 * (p // 32 + 1)) with
  the positions after p masked (they weigh exactly 0, whatever stale K/V they hold): the
  reduction length is a function of p alone. Queries of one block share one padded call,
  at least 4 and at most 32 query rows per slot (see _Bucket). Attending one query at a time
  over exactly its prefix is invariant too, but costs ~35 us per token and layer.
The rest is row-wise (RMSNorm, rotary, SiLU, residual adds, the logits' softmax); elementwise
kernels see rows whose widths are multiples of the SIMD step, so no row lands in a scalar tail.
Verified at 1 thread, as the engine runs here; more threads may split a matmul differently.
Deterministic mode verifies chains only (forward refuses a tree): a tree node's key block and
the places of its masked keys differ from those of the same path fed as a chain, so its bits
would too. The engine verifies the tree's most probable path there instead.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine import _kernels

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_AVX512 = _kernels.has_avx512()  # the native matmul's wider kernel


@dataclass(slots=True)
class _Layer:
    input_norm: Tensor  # [hidden]
    qkv: Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]: q, k, v projections stacked
    qkv_bias: Tensor | None
    o: Tensor  # [hidden, heads * head_dim]
    post_norm: Tensor  # [hidden]
    gate_up: Tensor  # [2 * intermediate, hidden]: gate then up
    down: Tensor  # [hidden, intermediate]


class Runner:
    """The model's forward with a preallocated KV cache of `slots` x `max_len` positions."""

    def __init__(
        self,
        model: torch.nn.Module,
        slots: int,
        max_len: int,
        batched_max_chunk: int = 32,
        deterministic: bool = False,
        small_matmul: bool = True,
        small_matmul_rows: int | None = None,
        native_attention: bool = True,
    ) -> None:
        """`batched_max_chunk`: chunks of at most this many tokens (decode and verify steps)
        attend in padded batched calls, one per width class (_AttentionPlan.by_width), longer
        ones one slot at a time; 0 always loops. `deterministic`: batch-invariant numerics (see the
        module docstring); RuntimeError where this machine's matmuls cannot give them.
        `small_matmul`: multiply few-row batches with the native kernel (_SmallMatmul) where it
        applies (fp32 on an AVX2 CPU, default mode) and is faster; False always uses torch.
        `small_matmul_rows`: forwards of 1 to this many token rows use it; None measures the
        row counts where it beats torch on this model's weights (_SmallMatmul.faster_rows).
        `native_attention`: decode and verify chunks attend in one native call per layer
        (_kernels.attention) where it applies (fp32 on an AVX2 CPU, default mode, head dim 16,
        32, 64, 96 or 128); False keeps torch's padded and per-slot calls."""
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        config: Any = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model type {config.model_type!r}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r}")
        self.slots = slots
        self.max_len = max_len
        self.batched_max_chunk = batched_max_chunk
        self.deterministic = deterministic
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or (
            config.hidden_size // self.num_heads
        )
        self.eps: float = config.rms_norm_eps
        self.vocab_size: int = config.vocab_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.load_weights(model)
        applies = (
            small_matmul
            and not deterministic
            and _SmallMatmul.applies(self.device, self.dtype, self._weights())
        )
        # Forwards of first to last token rows (both included) multiply on the native kernel.
        self.small_matmul_rows: tuple[int, int] = (0, 0)
        if applies and small_matmul_rows is None:
            self.small_matmul_rows = _SmallMatmul.faster_rows(
                self.matmul_weights(), torch.get_num_threads()
            )
        elif applies and small_matmul_rows:
            self.small_matmul_rows = (1, min(small_matmul_rows, _SmallMatmul.MAX_ROWS))
        self.small_matmul = self.small_matmul_rows[1] > 0
        self.native_attention = (
            native_attention
            and not deterministic
            and _kernels.available()
            and self.device.type == "cpu"
            and self.dtype == torch.float32
            and _kernels.attention_supports_dim(self.head_dim)
        )
        shape = (len(self.layers), slots, self.num_kv_heads, max_len, self.head_dim)
        # Zeroed, not empty: batched attention reads (masked) positions past a slot's length,
        # and 0 * NaN from uninitialised memory would poison the output. Zero pages are only
        # backed by memory once a slot grows into them.
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.lengths = [0] * slots  # positions of each slot's cache that hold valid K/V
        if deterministic:
            self._invariant_linear = _invariant_linear_for(self.device, self.dtype, self._weights())
            _check_row_invariance(self._weights(), self._invariant_linear)

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module) -> None:
        """Take (and fuse) the weights of a Hugging Face Llama-family model of this shape."""
        hf: Any = model  # a Hugging Face *ForCausalLM: its submodules are read by name
        inner = hf.model
        # Detached: the native matmul refuses tensors that require grad.
        self.embed: Tensor = inner.embed_tokens.weight.detach()
        self.lm_head: Tensor = hf.get_output_embeddings().weight.detach()
        self.final_norm: Tensor = inner.norm.weight.detach()
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            biases = [p.bias for p in projections]
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight,
                    qkv=torch.cat([p.weight for p in projections]),
                    qkv_bias=None if biases[0] is None else torch.cat(biases),
                    o=attn.o_proj.weight.detach(),
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    down=mlp.down_proj.weight.detach(),
                )
            )
        # cos/sin for every position, from the model's own rotary module (so its rope
        # scaling is honoured): [max_len, head_dim].
        positions = torch.arange(self.max_len, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)

    def _weights(self) -> list[tuple[Tensor, Tensor | None]]:
        """One layer's matmul weights (with bias) and the LM head: every shape forward uses."""
        layer = self.layers[0]
        return [
            (layer.qkv, layer.qkv_bias),
            (layer.o, None),
            (layer.gate_up, None),
            (layer.down, None),
            (self.lm_head, None),
        ]

    def matmul_weights(self) -> list[tuple[Tensor, Tensor | None]]:
        """Every matmul weight of a forward, in its order (with bias)."""
        weights: list[tuple[Tensor, Tensor | None]] = []
        for layer in self.layers:
            weights += [(layer.qkv, layer.qkv_bias), (layer.o, None), (layer.gate_up, None)]
            weights.append((layer.down, None))
        return [*weights, (self.lm_head, None)]

    def reset(self, slot: int | None = None) -> None:
        """Forget one slot's cache (or every slot's)."""
        if slot is None:
            self.lengths = [0] * self.slots
        else:
            self.lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` cached positions of `slot` (rollback of rejected drafts)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(
                f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}"
            )
        self.lengths[slot] = length

    def keep_path(self, slot: int, start: int, path: Sequence[int]) -> None:
        """After verifying a tree fed at cache positions start, start + 1, ... of `slot`: keep
        the draft nodes `path` (increasing draft indices: the accepted root-to-node path) at
        positions start .. start + len(path) - 1, where a chain would have put them, and drop
        the rest of the tree. Their K/V were rotated at those positions (depth-based), so the
        moved entries are what feeding the path as a chain would have cached."""
        end = start + len(path)
        if not 0 <= start <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions, not {start}")
        if any(b <= a for a, b in itertools.pairwise(path)) or (
            path and (path[0] < 0 or start + path[-1] >= self.lengths[slot])
        ):
            raise ValueError(f"slot {slot}: {list(path)} is not a path of its last tree")
        moved = [i for i, node in enumerate(path) if node != i]
        if moved:
            first = moved[0]  # the path's nodes before it already sit in place
            source = torch.tensor(path[first:], device=self.device) + start
            # index_select copies the sources before the (lower or equal) targets change. (An
            # advanced-index read here took 5 ms at 2 threads on this loaded CPU, this 0.03.)
            for cache in (self.k_cache, self.v_cache):
                cache[:, slot, :, start + first : end] = cache[:, slot].index_select(2, source)
        self.lengths[slot] = end

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give slot `target` the first `length` cached positions of slot `source` (samples of
        one prompt share its K/V instead of recomputing it)."""
        if not 0 <= length <= self.lengths[source]:
            raise ValueError(f"slot {source} holds {self.lengths[source]} positions, not {length}")
        if source != target:
            self.k_cache[:, target, :, :length] = self.k_cache[:, source, :, :length]
            self.v_cache[:, target, :, :length] = self.v_cache[:, source, :, :length]
        self.lengths[target] = length

    @torch.no_grad()
    def forward(
        self,
        slots: Sequence[int],
        chunks: Sequence[Sequence[int]],
        num_logits: Sequence[int] | None = None,
        trees: Sequence[Sequence[int] | None] | None = None,
    ) -> Tensor:
        """Append each chunk to its slot's cache and return logits [sum(num_logits), vocab]:
        for each slot in order, the logits of its chunk's last num_logits[i] tokens (all of
        them by default), each predicting the token after it.

        trees[i], where given and not None: chunk i ends in a tree draft whose node j (one of
        its last len(trees[i]) tokens) follows node trees[i][j] (-1: the chunk's token before
        the tree; a parent comes before its children), and each node's logits predict the
        token after its own root-to-node path (see the module docstring). A chain's parents
        cost nothing over None. ValueError in deterministic mode for any other tree."""
        tree_masks = _TreeMask.build_all(chunks, trees, self.device)
        if tree_masks and self.deterministic:
            raise ValueError("deterministic mode verifies chain drafts only, not trees")
        threads = torch.get_num_threads()
        first, last = self.small_matmul_rows
        if first <= sum(len(chunk) for chunk in chunks) <= last:
            # The kernels' threads do the matmuls and the attention; torch's other work keeps
            # to this thread (its pool spinning beside the kernels' would slow both).
            kernel = functools.partial(_SmallMatmul.linear, threads=threads)
            with _torch_threads(1):
                return self._forward(slots, chunks, num_logits, kernel, tree_masks, threads)
        linear = self._invariant_linear if self.deterministic else F.linear
        # Torch's threads do the matmuls and spin between them, so native attention keeps to
        # this thread (measured here, 32 slots with 8 verifying 2-token drafts: 213 ms a step
        # with 2 threads against 145 with 1).
        return self._forward(slots, chunks, num_logits, linear, tree_masks, 1)

    def _forward(
        self,
        slots: Sequence[int],
        chunks: Sequence[Sequence[int]],
        num_logits: Sequence[int] | None,
        linear: Callable[..., Tensor],
        tree_masks: dict[int, _TreeMask],
        attention_threads: int,
    ) -> Tensor:
        if len(slots) != len(chunks):
            raise ValueError("slots and chunks must have the same length")
        if len(set(slots)) != len(slots):
            raise ValueError("a slot may appear once per forward")
        sizes = [len(chunk) for chunk in chunks]
        starts = [self.lengths[slot] for slot in slots]
        wanted = list(sizes) if num_logits is None else list(num_logits)
        for slot, start, size, want in zip(slots, starts, sizes, wanted, strict=True):
            if size < 1:
                raise ValueError(f"slot {slot}: empty chunk")
            if start + size > self.max_len:
                raise ValueError(f"slot {slot}: {start + size} positions exceed {self.max_len}")
            if not 1 <= want <= size:
                raise ValueError(f"slot {slot}: num_logits {want} not in [1, {size}]")
        device = self.device
        ids = torch.tensor([t for chunk in chunks for t in chunk], dtype=torch.long, device=device)
        positions = torch.cat(
            [torch.arange(s, s + n, device=device) for s, n in zip(starts, sizes, strict=True)]
        )
        rotary = positions  # a tree's nodes rotate at their depth, not their cache position
        if tree_masks:
            rotary = positions.clone()
            offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
            for i, tree in tree_masks.items():
                nodes = len(tree.depths)
                base = starts[i] + sizes[i] - nodes - 1  # the token before the tree
                rotary[offsets[i + 1] - nodes : offsets[i + 1]] = base + tree.depths
        cos, sin = self.cos[rotary][:, None], self.sin[rotary][:, None]  # [T, 1, D]
        token_slots = torch.repeat_interleave(
            torch.tensor(slots, device=device), torch.tensor(sizes, device=device)
        )
        if self.deterministic:
            plan = _AttentionPlan(_Bucket.build_all(slots, starts, sizes, self.max_len, device))
        else:
            plan = _AttentionPlan.by_width(
                slots,
                starts,
                sizes,
                self.batched_max_chunk,
                device,
                tree_masks,
                native_threads=attention_threads if self.native_attention else 0,
            )
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        x = self.embed[ids]
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, self.eps)
            qkv = linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = torch.split(qkv, [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            q = _rope(q.view(-1, heads, dim), cos, sin)
            k = _rope(k.view(-1, kv_heads, dim), cos, sin)
            v = v.view(-1, kv_heads, dim)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            # Indices on dims 0 and 2 around a slice: the indexed view is [T, kv_heads, dim].
            k_cache[token_slots, :, positions] = k
            v_cache[token_slots, :, positions] = v
            attended = plan.attend(q, k_cache, v_cache)
            x = x + linear(attended.reshape(-1, heads * dim), layer.o)
            h = _rms_norm(x, layer.post_norm, self.eps)
            gate, up = linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, layer.down)
        for slot, start, size in zip(slots, starts, sizes, strict=True):
            self.lengths[slot] = start + size
        if wanted != sizes:
            ends = torch.tensor(sizes, device=device).cumsum(0).tolist()
            rows = torch.cat(
                [torch.arange(e - w, e, device=device) for e, w in zip(ends, wanted, strict=True)]
            )
            x = x[rows]
        return linear(_rms_norm(x, self.final_norm, self.eps), self.lm_head)


@dataclass(frozen=True, slots=True)
class _TreeMask:
    """The tree draft at the end of one chunk: each node's depth (1 for a child of the token
    before the tree) and which nodes it sees (itself and its ancestors)."""

    depths: Tensor  # [nodes] long
    sees: Tensor  # [nodes, nodes] bool: sees[i, j] when node j is node i or an ancestor of it

    @staticmethod
    def build_all(
        chunks: Sequence[Sequence[int]],
        trees: Sequence[Sequence[int] | None] | None,
        device: torch.device,
    ) -> dict[int, _TreeMask]:
        """The masks of the chunks whose tree is not a chain, by chunk index."""
        if trees is None:
            return {}
        if len(trees) != len(chunks):
            raise ValueError("trees and chunks must have the same length")
        masks = {}
        for i, (chunk, parents) in enumerate(zip(chunks, trees, strict=True)):
            if parents is None or all(p == j - 1 for j, p in enumerate(parents)):
                continue
            if len(parents) >= len(chunk):
                raise ValueError(
                    f"chunk {i}: a tree of {len(parents)} nodes needs a token before it"
                )
            nodes = len(parents)
            depths = [0] * nodes
            sees = [[False] * nodes for _ in range(nodes)]
            for j, parent in enumerate(parents):
                if not -1 <= parent < j:
                    raise ValueError(f"chunk {i}: node {j} has parent {parent}")
                if parent >= 0:
                    depths[j] = depths[parent] + 1
                    sees[j][:parent] = sees[parent][:parent]
                    sees[j][parent] = True
                else:
                    depths[j] = 1
                sees[j][j] = True
            masks[i] = _TreeMask(
                torch.tensor(depths, device=device), torch.tensor(sees, device=device)
            )
        return masks

    def apply(self, mask: Tensor, start: int, size: int) -> None:
        """Write the tree over a chunk's causal mask [>= size queries, keys], in place: the
        chunk (size tokens from cache position start) ends in the tree."""
        nodes = len(self.depths)
        first = start + size - nodes  # the cache position of node 0
        mask[size - nodes : size, first : first + nodes] = self.sees


@dataclass(frozen=True, slots=True)
class _Padding:
    """How a ragged batch of chunks maps onto a padded grid: one row per slot of the span
    [first, first + rows) of slots it touches, one column per token of the longest chunk.
    Attending over the span's caches as one view copies no K/V; rows of idle slots in the
    span compute on zero queries and are dropped (the engine hands out the lowest free slots,
    so the span stays close to the batch)."""

    first: int  # lowest slot in the batch
    rows: int  # slots in the span
    token_rows: Tensor  # [T] grid row of each token
    token_cols: Tensor  # [T] grid column (index within its chunk) of each token
    width: int  # longest chunk
    keys: int  # cache positions attended: the furthest end of any chunk
    mask: Tensor  # [rows, 1, width, keys]: token i of a chunk sees positions <= start + i

    @staticmethod
    def build(
        slots: Sequence[int], starts: Sequence[int], sizes: Sequence[int], device: torch.device
    ) -> _Padding:
        first = min(slots)
        rows = max(slots) - first + 1
        width = max(sizes)
        keys = max(s + n for s, n in zip(starts, sizes, strict=True))
        span_starts = [0] * rows
        for slot, start in zip(slots, starts, strict=True):
            span_starts[slot - first] = start
        token_rows = torch.repeat_interleave(
            torch.tensor([slot - first for slot in slots], device=device),
            torch.tensor(sizes, device=device),
        )
        token_cols = torch.cat([torch.arange(n, device=device) for n in sizes])
        limit = torch.tensor(span_starts, device=device)[:, None] + torch.arange(
            width, device=device
        )
        mask = torch.arange(keys, device=device)[None, None, :] <= limit[:, :, None]
        return _Padding(first, rows, token_rows, token_cols, width, keys, mask[:, None])


def _batched_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pad: _Padding) -> Tensor:
    """Attention of every token over its slot's cache in one call; padded positions see
    finite stale or zero K/V and are dropped. Returns [T, heads, head_dim]."""
    grid = q.new_zeros(pad.rows, pad.width, q.shape[1], q.shape[2])
    grid[pad.token_rows, pad.token_cols] = q
    span = slice(pad.first, pad.first + pad.rows)
    out = F.scaled_dot_product_attention(
        grid.transpose(1, 2),
        k_cache[span, :, : pad.keys],
        v_cache[span, :, : pad.keys],
        attn_mask=pad.mask,
        enable_gqa=True,
    )
    return out.transpose(1, 2)[pad.token_rows, pad.token_cols]


@dataclass(frozen=True, slots=True)
class _Looped:
    """One slot's chunk attending alone over exactly its cached positions."""

    offset: int  # index of its first token among the forward's tokens
    slot: int
    start: int
    size: int
    mask: Tensor | None


def _width_class(size: int) -> int:
    """Chunks of 1, 2, 3-4, 5-8, ... tokens: one padded call wastes less than half its grid."""
    return (size - 1).bit_length()


@dataclass(frozen=True, slots=True)
class _Native:
    """Chunks attending in one call of the native kernel (_kernels.attention)."""

    chunks: Tensor  # [n, 4] int64 rows (offset, slot, start, size), as the kernel takes them
    threads: int


@dataclass(frozen=True, slots=True)
class _AttentionPlan:
    """Which tokens of a forward attend in which call: the native kernel's one call (native),
    padded batched calls (grids: the tokens' indices and their grid, as a _Bucket holds them)
    and slots attending one at a time (loops). attend() returns [T, heads, head_dim]."""

    grids: list[_Bucket]
    loops: list[_Looped] = field(default_factory=list)
    native: _Native | None = None

    @staticmethod
    def by_width(
        slots: Sequence[int],
        starts: Sequence[int],
        sizes: Sequence[int],
        max_chunk: int,
        device: torch.device,
        tree_masks: dict[int, _TreeMask] | None = None,
        native_threads: int = 0,
    ) -> _AttentionPlan:
        """Default mode. With native_threads > 0 every chunk of at most max_chunk tokens that
        is not a tree attends in one native call (its threads) whatever the widths. Torch's
        calls take the rest: a padded call is as wide as its longest chunk and as tall as its
        slot span, so chunks of one width class share a call (measured here: one 9-token draft
        among 31 one-token rows padded all 32 to 9 queries and nearly doubled the forward),
        where they are at least 2 and fill at least half of their span; the rest (long
        prefill chunks, lone or scattered widths) attend one slot at a time. A tree chunk
        (tree_masks, by chunk index) takes its place like any chunk of its width, with its
        tree's mask written over its rows."""
        tree_masks = tree_masks or {}
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        native = None
        grouped: set[int] = set()
        if native_threads > 0:
            rows = [i for i, n in enumerate(sizes) if n <= max_chunk and i not in tree_masks]
            if rows:
                table = [[offsets[i], slots[i], starts[i], sizes[i]] for i in rows]
                native = _Native(torch.tensor(table, dtype=torch.int64), native_threads)
                grouped.update(rows)
        classes: dict[int, list[int]] = {}
        for i, size in enumerate(sizes):
            if size <= max_chunk and i not in grouped:
                classes.setdefault(_width_class(size), []).append(i)
        grids = []
        for rows in classes.values():
            span = max(slots[i] for i in rows) - min(slots[i] for i in rows) + 1
            if len(rows) < 2 or 2 * len(rows) < span:
                continue
            tokens = torch.cat(
                [torch.arange(offsets[i], offsets[i + 1], device=device) for i in rows]
            )
            grid = _Padding.build(
                [slots[i] for i in rows],
                [starts[i] for i in rows],
                [sizes[i] for i in rows],
                device,
            )
            for i in rows:
                if i in tree_masks:
                    tree_masks[i].apply(grid.mask[slots[i] - grid.first, 0], starts[i], sizes[i])
            grids.append(_Bucket(tokens, grid))
            grouped.update(rows)
        loops = []
        for i in range(len(slots)):
            if i in grouped:
                continue
            mask = _causal_mask(starts[i], sizes[i], device)
            if i in tree_masks:
                assert mask is not None  # a tree chunk has at least 3 tokens
                tree_masks[i].apply(mask, starts[i], sizes[i])
            loops.append(_Looped(offsets[i], slots[i], starts[i], sizes[i], mask))
        return _AttentionPlan(grids, loops, native)

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        only_grid = self.native is None and not self.loops and len(self.grids) == 1
        if only_grid and len(self.grids[0].tokens) == len(q):
            # Every token in one call (a plain decode step): no gather or scatter.
            return _batched_attention(q, k_cache, v_cache, self.grids[0].grid)
        attended = torch.empty_like(q)
        if self.native is not None:
            scale = q.shape[-1] ** -0.5
            _kernels.attention(
                q, k_cache, v_cache, attended, self.native.chunks, scale, self.native.threads
            )
        for bucket in self.grids:
            attended[bucket.tokens] = _batched_attention(
                q[bucket.tokens], k_cache, v_cache, bucket.grid
            )
        for loop in self.loops:
            end = loop.start + loop.size
            out = F.scaled_dot_product_attention(
                q[loop.offset : loop.offset + loop.size].transpose(0, 1)[None],
                k_cache[loop.slot, :, :end][None],
                v_cache[loop.slot, :, :end][None],
                attn_mask=loop.mask,
                enable_gqa=True,
            )
            attended[loop.offset : loop.offset + loop.size] = out[0].transpose(0, 1)
        return attended


# Deterministic attention: a query at position p attends over the key block [0, KEY_BLOCK *
# (p // KEY_BLOCK + 1)), its later positions masked. The width depends on p alone, so every
# query of a bucket can share one call whoever its companions are.
_KEY_BLOCK = 32


@dataclass(frozen=True, slots=True)
class _Bucket:
    """The tokens of a forward whose positions fall in one key block, on a padded grid as in
    _Padding: at most _KEY_BLOCK columns (one query block of SDPA's CPU kernel) and at least
    _MIN_INVARIANT_ROWS (its QK and PV matmuls then round each row alike). Measured here:
    a query row's output is bitwise the same for any grid width in [4, 32], grid row, batch
    companions and stale K/V under the mask (masked keys weigh exactly 0)."""

    tokens: Tensor  # [N] indices into the forward's tokens
    # Its grid: keys is the block's end (a function of the block alone); in the mask a token
    # sees positions <= its own, padding sees none.
    grid: _Padding

    @staticmethod
    def build_all(
        slots: Sequence[int],
        starts: Sequence[int],
        sizes: Sequence[int],
        max_len: int,
        device: torch.device,
    ) -> list[_Bucket]:
        counts = torch.tensor(sizes, device=device)
        token_slots = torch.repeat_interleave(torch.tensor(slots, device=device), counts)
        token_starts = torch.repeat_interleave(torch.tensor(starts, device=device), counts)
        positions = torch.cat(
            [torch.arange(s, s + n, device=device) for s, n in zip(starts, sizes, strict=True)]
        )
        blocks = positions // _KEY_BLOCK
        buckets = []
        for block in sorted(set(blocks.tolist())):
            tokens = (blocks == block).nonzero()[:, 0]
            first = int(token_slots[tokens].min())
            token_rows = token_slots[tokens] - first
            # A slot's tokens in the block are consecutive from its chunk start or the block's.
            token_cols = positions[tokens] - token_starts[tokens].clamp(min=block * _KEY_BLOCK)
            rows = int(token_rows.max()) + 1
            width = max(int(token_cols.max()) + 1, _MIN_INVARIANT_ROWS)
            keys = min((block + 1) * _KEY_BLOCK, max_len)
            seen = torch.zeros(rows, width, dtype=torch.long, device=device)
            seen[token_rows, token_cols] = positions[tokens]
            mask = torch.arange(keys, device=device)[None, None, :] <= seen[:, :, None]
            grid = _Padding(first, rows, token_rows, token_cols, width, keys, mask[:, None])
            buckets.append(_Bucket(tokens, grid))
        return buckets


class _SmallMatmul:
    """x @ weight.T by service.engine._kernels for batches of at most MAX_ROWS token rows
    (decode and verify steps): it streams the weights once where MKL's sgemm packs them per
    call, on AVX-512 where the CPU has it. On an AMD EPYC (Zen 1) here, SmolLM2's matmuls at 9
    rows took 45 ms instead of 140, and MKL was faster only above about 64 rows. On an Intel
    Xeon with AVX-512 here, MKL's gemv was faster at 1-3 rows (18.8 against 19.8 ms at 1) and
    its sgemm above about 16, the AVX-512 kernel at 4-12 (27.4 against 32.6 ms at 4, 38.7
    against 47.0 at 12). So the runner measures where it is faster on its own weights
    (faster_rows). Each row's result is independent of the others."""

    MAX_ROWS = 64
    _ROW_COUNTS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
    # How much faster the kernel must time to be taken: a draw of a noisy machine once gave it
    # 2 rows here, where it is 15% slower, and a lone request's first draft token then cost
    # 16 ms instead of 3.
    _MARGIN = 0.05
    # threads, the LM head's storage and the weights' shapes -> (first, last) row counts
    _measured: ClassVar[dict[tuple[object, ...], tuple[int, int]]] = {}

    @classmethod
    def faster_rows(
        cls, weights: Sequence[tuple[Tensor, Tensor | None]], threads: int
    ) -> tuple[int, int]:
        """The first and last row counts (of _ROW_COUNTS) of the first unbroken run of counts
        at which this kernel multiplied x by every one of `weights` at least _MARGIN faster
        than torch: each count best of three rounds of the two taken in turns, every weight
        once per round (they stream from memory, as in a forward). (0, 0) where torch won at
        every count. Measured once per model and thread count (about 1.8 s for SmolLM2), so
        that every runner of a model takes the same kernels: the last weight, the LM head, is
        the model's own tensor (the fused ones are each runner's copies) and stands for the
        model."""
        key = (threads, weights[-1][0].data_ptr(), *(tuple(w.shape) for w, _ in weights))
        if key not in cls._measured:
            cls._measured[key] = cls._measure(weights, threads)
        return cls._measured[key]

    @classmethod
    def _measure(
        cls, weights: Sequence[tuple[Tensor, Tensor | None]], threads: int
    ) -> tuple[int, int]:
        generator = torch.Generator().manual_seed(0)  # leaves torch's global stream alone
        inputs = {
            w.shape[1]: torch.randn(max(cls._ROW_COUNTS), w.shape[1], generator=generator)
            for w, _ in weights
        }

        def seconds(multiply: Callable[[Tensor, Tensor], object], rows: int) -> float:
            start = time.perf_counter()
            for weight, _ in weights:
                multiply(inputs[weight.shape[1]][:rows], weight)
            return time.perf_counter() - start

        def native(x: Tensor, weight: Tensor) -> None:
            cls.linear(x, weight, threads=threads)

        faster: list[int] = []
        for rows in cls._ROW_COUNTS:
            timed: dict[str, list[float]] = {"native": [], "torch": []}
            for _ in range(3):
                timed["native"].append(seconds(native, rows))
                timed["torch"].append(seconds(F.linear, rows))
            if min(timed["native"]) < (1 - cls._MARGIN) * min(timed["torch"]):
                faster.append(rows)
            elif faster:
                break
        return (faster[0], faster[-1]) if faster else (0, 0)

    @staticmethod
    def applies(
        device: torch.device, dtype: torch.dtype, weights: Sequence[tuple[Tensor, Tensor | None]]
    ) -> bool:
        return (
            _kernels.available()
            and device.type == "cpu"
            and dtype == torch.float32
            and all(w.is_contiguous() and w.shape[1] % 8 == 0 for w, _ in weights)
        )

    @staticmethod
    def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, threads: int) -> Tensor:
        out = x.new_empty(x.shape[0], weight.shape[0])
        _kernels.linear(x.contiguous(), weight, out, threads, _AVX512)
        return out if bias is None else out.add_(bias)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# Fewer rows than this take other sgemm kernels (gemv at 1 row) that round differently.
_MIN_INVARIANT_ROWS = 4


def _padded_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear with fewer than _MIN_INVARIANT_ROWS rows padded up to it."""
    rows = x.shape[0]
    if rows >= _MIN_INVARIANT_ROWS:
        return F.linear(x, weight, bias)
    padded = x.new_zeros(_MIN_INVARIANT_ROWS, x.shape[1])
    padded[:rows] = x
    return F.linear(padded, weight, bias)[:rows]


def _invariant_linear_for(
    device: torch.device, dtype: torch.dtype, weights: Sequence[tuple[Tensor, Tensor | None]]
) -> Callable[..., Tensor]:
    """A linear whose row results do not depend on the other rows: the native kernel where it
    applies (it computes each row on its own, whatever the BLAS library would do), else
    _padded_linear (see the module docstring)."""
    if _SmallMatmul.applies(device, dtype, weights):
        return functools.partial(_SmallMatmul.linear, threads=1)
    return _padded_linear


def _check_row_invariance(
    weights: Sequence[tuple[Tensor, Tensor | None]], linear: Callable[..., Tensor]
) -> None:
    """RuntimeError unless `linear` gives a row the same bits at the first and last position
    of a few matmul heights (a few ms: the shapes that matter are the model's own)."""
    generator = torch.Generator().manual_seed(0)
    for weight, bias in weights:
        x = torch.randn(19, weight.shape[1], generator=generator)
        x = x.to(device=weight.device, dtype=weight.dtype)
        reference = linear(x[:1], weight, bias)[0]
        for rows in (_MIN_INVARIANT_ROWS, 7, 19):
            first = linear(x[:rows], weight, bias)[0]
            last = linear(x[:rows].roll(rows - 1, dims=0), weight, bias)[-1]
            for out in (first, last):
                if not torch.equal(out, reference):
                    raise RuntimeError(
                        "deterministic mode: this machine's matmuls round a row differently "
                        f"with {rows} rows than with one (weight {tuple(weight.shape)})"
                    )


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # As Hugging Face's LlamaRMSNorm: normalise in fp32, scale in the weights' dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _causal_mask(start: int, size: int, device: torch.device) -> Tensor | None:
    """New token i (at position start + i) sees cached positions <= start + i."""
    if size == 1:
        return None
    keys = torch.arange(start + size, device=device)
    queries = torch.arange(start, start + size, device=device)
    return keys[None, :] <= queries[:, None]
