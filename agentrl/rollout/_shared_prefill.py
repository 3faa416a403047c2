"""Prefill that runs a token prefix shared by several prompts once, for the ``hf`` backend.

A batch of agent prompts shares most of its tokens: every prompt opens with the same system prompt and tool
schemas, and at the second turn of a GRPO group the G episodes repeat their task's prompt before their own
first answer and its feedback. Left-padded prefill recomputes all of it per row. Here the distinct prompts
are sorted, split into groups by a small dynamic programme over their common prefixes (fewest tokens
computed, a forward call counted as :data:`CALL_COST` tokens), and each group runs its prefix once on one
row, then its rows' remainders on top of that prefix's keys and values.

Rows are right-padded: a group's prefix lies at the same columns in every row. Decoding then appends every
row's tokens at the same column while each row's positions continue from its own length, and the padding
between is masked, so a row sees exactly the keys and positions of its own unpadded sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["CALL_COST", "prefix_groups", "shared_prefill"]

CALL_COST = 64
"""What one more forward call costs, in tokens of prefill (per-call overhead on CPU, kernel launches on GPU)."""


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(prompts: Sequence[Sequence[int]], call_cost: int = CALL_COST) -> list[tuple[int, list[int]]]:
    """Split distinct prompts into groups that share a prefix, for the fewest tokens computed.

    A group of ``n`` prompts sharing ``s`` leading tokens costs ``s + n * (longest - s) + call_cost`` (its
    prefix once, then its rows right-padded to the longest). Every prompt keeps at least its last token
    outside the prefix (its logits come from the remainder). Groups are contiguous runs of the sorted
    prompts, chosen by dynamic programming (``O(n^2)`` for ``n`` prompts).

    Returns:
        ``(shared, indices)`` pairs covering every prompt once; ``shared`` is 0 for a group that runs no prefix.
    """
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    if not order:
        return []
    n = len(order)
    adjacent = [_common(prompts[order[k]], prompts[order[k + 1]]) for k in range(n - 1)]
    best = [0.0] * (n + 1)
    start = [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: the cheapest split of the first j sorted prompts
        best[j], shared, longest, shortest = float("inf"), 0, 0, len(prompts[order[j - 1]])
        for i in range(j, 0, -1):  # the last group is order[i-1 .. j-1]
            length = len(prompts[order[i - 1]])
            longest, shortest = max(longest, length), min(shortest, length)
            shared = shortest - 1 if i == j else min(shared, adjacent[i - 1], shortest - 1)
            s = 0 if i == j else shared  # one prompt alone gains nothing from a separate prefix call
            cost = best[i - 1] + s + (j - i + 1) * (longest - s) + call_cost * (2 if s else 1)
            if cost < best[j]:
                best[j], start[j] = cost, i - 1
    groups: list[tuple[int, list[int]]] = []
    j = n
    while j > 0:
        i = start[j]
        members = order[i:j]
        shared = min([len(prompts[m]) - 1 for m in members] + adjacent[i : j - 1]) if len(members) > 1 else 0
        groups.append((shared, members))
        j = i
    return groups[::-1]


def shared_prefill(
    model: Any, prompts: Sequence[Sequence[int]], new_tokens: int, pad_id: int, make_cache: Any, last_only: bool
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Prefill distinct ``prompts`` group by group (see :func:`prefix_groups`) into one right-padded cache.

    Args:
        model: the causal LM.
        prompts: distinct token prompts.
        new_tokens: room to leave in the cache for decoding.
        pad_id: the id written in padding (masked, never attended to).
        make_cache: ``capacity -> Cache`` with in-place buffers (``agentrl.rollout.hf._preallocated_cache``).
        last_only: the model's forward takes ``logits_to_keep`` (indices of the positions whose logits it returns).

    Returns:
        ``(logits_B_V, cache, attention_B_T, positions_B_1)`` as ``HFPolicy._prefill`` returns them: next-token
        logits per prompt, the filled cache, the attention mask over ``width + new_tokens`` columns, and each
        prompt's last position.
    """
    import torch

    width = max(len(p) for p in prompts)
    rows = len(prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        attention[row, : len(prompt)] = 1
    device = next(model.parameters()).device
    ids, attention = ids.to(device), attention.to(device)
    logits: torch.Tensor | None = None
    full = make_cache(width + new_tokens)
    for shared, members in prefix_groups(prompts):
        index = torch.tensor(members, device=device)
        end = max(len(prompts[m]) for m in members)
        cache = make_cache(end)
        if shared:
            prefix = make_cache(shared)
            model(input_ids=ids[members[:1], :shared], position_ids=torch.arange(shared, device=device)[None],
                  past_key_values=prefix, use_cache=True, **({"logits_to_keep": 1} if last_only else {}))  # fmt: skip
            for layer, source in zip(cache.layers, prefix.layers, strict=True):
                n = len(members)
                layer.update(source.keys.expand(n, -1, -1, -1), source.values.expand(n, -1, -1, -1))
        last = [len(prompts[m]) - 1 - shared for m in members]  # each row's last prompt token, in the remainder
        keep = sorted(set(last))
        out = model(
            input_ids=ids[index, shared:end], attention_mask=attention[index, :end],
            position_ids=torch.arange(shared, end, device=device).expand(len(members), -1),
            past_key_values=cache, use_cache=True,
            **({"logits_to_keep": torch.tensor(keep, device=device)} if last_only else {}),
        )  # fmt: skip
        columns = torch.tensor([keep.index(c) if last_only else c for c in last], device=device)
        group_logits = out.logits[torch.arange(len(members), device=device), columns]
        if logits is None:
            logits = group_logits.new_empty(rows, group_logits.shape[-1])
            for layer, source in zip(full.layers, cache.layers, strict=True):  # zeros: padding must stay finite
                shape = (rows, source.keys.shape[1], width, source.keys.shape[-1])
                layer.update(source.keys.new_zeros(shape), source.values.new_zeros(shape))
        logits[index] = group_logits
        for layer, source in zip(full.layers, cache.layers, strict=True):
            layer.key_buffer[index, :, :end] = source.keys
            layer.value_buffer[index, :, :end] = source.values
    assert logits is not None
    positions = torch.tensor([[len(p) - 1] for p in prompts], device=device)
    attention = torch.cat([attention, attention.new_ones(rows, new_tokens)], dim=1)
    return logits, full, attention, positions
