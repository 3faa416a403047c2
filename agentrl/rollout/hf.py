"""The ``hf`` backend: a transformers causal LM on CPU or GPU, with dynamic batching and a KV cache.

Requests from concurrent episodes queue up; after a short window (or as soon as ``max_batch`` are waiting)
they run as one batch: the prompts are prefilled together, a prefix several of them share (system prompt,
tool schemas, a GRPO group's earlier turns) only once, then decoded token by token
with a KV cache preallocated for the whole batch (each step writes in place; finished rows leave the batch
once a quarter of it has finished). Each request keeps its own sampling parameters and random generator,
so a seeded request samples the same tokens whatever it is batched with.

The torch work runs on one worker thread, so the event loop (envs, tools, other episodes) stays
responsive while the model computes, and a weight update never interleaves with a batch.

Logprobs are those of the distribution sampled from: ``log_softmax`` of ``logits / temperature`` after
top-k, then top-p filtering (:func:`sampling_logprobs`, which learners can reuse to stay on-policy). Greedy
requests (``temperature == 0``) take the argmax and report the logprob under ``log_softmax(logits)``.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentrl.algos.sampling import sampling_logprobs
from agentrl.errors import ConfigError
from agentrl.rollout._shared_prefill import shared_prefill
from agentrl.rollout.policy import FinishReason, Generation, SamplingParams

if TYPE_CHECKING:
    import torch

__all__ = ["HFPolicy", "sampling_logprobs"]


@dataclass
class _Request:
    prompt: list[int]
    sampling: SamplingParams
    future: asyncio.Future[Generation]


class HFPolicy:
    """A transformers model as a :class:`~agentrl.rollout.policy.Policy` (registered as ``"hf"``).

    Args:
        model: a hub id, a local model directory, ``"tiny"``, or a loaded ``torch.nn.Module`` (a causal LM).
        tokenizer: its tokenizer, for the EOS id; loaded from ``model`` when that is a name.
        device: where the model runs (``"cpu"``, ``"cuda:0"``, ...).
        dtype: the weights' dtype (a ``torch.dtype`` or its name); None keeps the checkpoint's.
        max_batch: the most requests decoded together.
        batch_window_s: how long the first waiting request waits for others to join its batch.
        max_context: the context window; defaults to the model's ``max_position_embeddings``.
        seed: seeds the generator of requests that carry no seed of their own.
        share_prefix: prefill a prefix shared by several prompts once (system prompt, tool schemas, a GRPO
            group's task and earlier turns; see :mod:`agentrl.rollout._shared_prefill`). Same tokens and
            logprobs up to float rounding; models whose cache cannot be preallocated always prefill per row.

    Raises:
        ConfigError: the model cannot be loaded, or a setting is invalid.
    """

    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: Any = "cpu",
        dtype: Any = None,
        max_batch: int = 64,
        batch_window_s: float = 0.002,
        max_context: int | None = None,
        seed: int = 0,
        share_prefix: bool = True,
    ):
        import torch

        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        if isinstance(model, str | os.PathLike):
            from agentrl.models.loading import load_model, load_tokenizer

            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
            model = load_model(model, dtype=dtype, device=device)
        elif not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a name, a path or a torch.nn.Module, got {type(model).__name__}")
        else:
            model = model.to(device=device, dtype=_dtype(dtype)) if dtype is not None else model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.vocab_size: int = model.get_input_embeddings().num_embeddings
        self.max_context: int = max_context or getattr(model.config, "max_position_embeddings", None) or 2048
        self.eos_token_ids = _eos_ids(model, tokenizer)
        # Prefill needs logits at the last position only; most models can skip the others.
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in _parameters(model.forward) else {}
        self.pad_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.max_batch, self.batch_window_s, self.share_prefix = max_batch, batch_window_s, share_prefix
        self.version = 0
        self._rng = torch.Generator().manual_seed(seed)  # on CPU: the uniforms are drawn there
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="agentrl-hf")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Request] = []
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- Policy protocol ---------------------------------------------------------------------------
    async def generate(
        self, prompt: Sequence[Any], sampling: SamplingParams, *, tools: Sequence[Any] | None = None
    ) -> Generation:
        """Sample a continuation of ``prompt`` (token ids), batched with concurrent requests.

        ``tools`` is not used: a token prompt already holds the tools, rendered by the chat template.

        Raises:
            ConfigError: messages instead of ids, ids outside the vocabulary, or no room left in the context.
            RuntimeError: the policy was closed.
        """
        request = _Request(self._check_prompt(prompt, sampling), sampling, asyncio.get_running_loop().create_future())
        self._enqueue(request)
        return await request.future

    async def update_weights(self, named_tensors: Any) -> None:
        """Load ``(name, tensor)`` pairs (or a state dict) into the model between batches; bump :attr:`version`.

        Raises:
            ConfigError: a name the model does not have.
        """
        items = named_tensors.items() if hasattr(named_tensors, "items") else named_tensors
        await asyncio.get_running_loop().run_in_executor(self._worker(), self._load_weights, list(items))

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Each token's untempered logprob given the ones before it (from the second on), under the weights of
        :attr:`version` (between batches: the identity check after a sync)."""
        rows = [[int(t) for t in row] for row in sequences]
        return await asyncio.get_running_loop().run_in_executor(self._worker(), self._score, rows)

    def _score(self, rows: list[list[int]]) -> list[list[float]]:
        import torch

        out = []
        with torch.inference_mode():
            for row in rows:
                ids = torch.tensor([row], device=self.device)
                logits = self.model(ids).logits[0, :-1].float()
                out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
        return out

    async def aclose(self) -> None:
        """Stop the worker thread; pending requests fail. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        for request in self._pending:
            if not request.future.done():
                request.future.set_exception(RuntimeError("the hf policy was closed"))
        self._pending = []

    # ---- batching on the event loop ----------------------------------------------------------------
    def _enqueue(self, request: _Request) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (e.g. another asyncio.run): start afresh
            self._loop, self._pending, self._timer, self._busy = loop, [], None, False
        self._pending.append(request)
        if self._busy:
            return  # the running batch starts the next one when it ends
        if len(self._pending) >= self.max_batch:
            self._start_batch()
        elif self._timer is None:
            self._timer = loop.call_later(self.batch_window_s, self._start_batch)

    def _start_batch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = [r for r in self._pending if not r.future.done()]  # drop cancelled requests
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[_Request]) -> None:
        try:
            prompts, params = [r.prompt for r in batch], [r.sampling for r in batch]
            results = await asyncio.get_running_loop().run_in_executor(
                self._worker(), self._generate_batch, prompts, params
            )
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(result)
        except Exception as exc:  # one failed batch fails its requests, each recorded on its episode
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
        finally:
            self._busy = False
            if self._pending:
                self._start_batch()

    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            raise RuntimeError("the hf policy was closed; make a new one")
        return self._executor

    def _check_prompt(self, prompt: Sequence[Any], sampling: SamplingParams) -> list[int]:
        if not prompt or not all(isinstance(t, int) for t in prompt):
            raise ConfigError(
                "the hf backend takes a non-empty list of token ids; render messages with "
                "agentrl.models.chat.ChatRenderer.prompt_ids first"
            )
        ids = list(prompt)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ConfigError(f"prompt token ids must be in [0, {self.vocab_size}); got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_context:
            raise ConfigError(f"a prompt of {len(ids)} tokens leaves no room in the {self.max_context}-token context")
        return ids

    # ---- torch work (worker thread) ----------------------------------------------------------------
    def _load_weights(self, items: list[tuple[str, Any]]) -> None:
        import torch

        state, own = dict(items), self.model.state_dict()
        unknown = [name for name in state if name not in own]
        if unknown:  # checked before loading anything, so a bad update leaves the weights as they were
            known = ", ".join(list(own)[:5])
            raise ConfigError(f"update_weights: the model has no {unknown[:5]} (it has e.g. {known})")
        with torch.no_grad():
            self.model.load_state_dict(state, strict=False)
        self.version += 1  # on the worker thread, so the next batch reads the new version with the new weights

    def _generate_batch(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
        import torch

        version = self.version
        with torch.inference_mode():
            rows = len(prompts)
            caps = [min(s.max_tokens, self.max_context - len(p)) for p, s in zip(prompts, params, strict=True)]
            stops = [set(self.eos_token_ids) | set(s.stop_token_ids) for s in params]
            sampler = _RowSampler(params, caps, self._rng, self.device)
            logits_B_V, cache, attention_B_T, positions_B_1 = self._prefill(prompts, max(caps))
            width = attention_B_T.shape[1] - max(caps)
            sampled: list[list[int]] = [[] for _ in range(rows)]
            logprobs: list[list[float]] = [[] for _ in range(rows)]
            finish: list[FinishReason] = ["length"] * rows
            batch_rows = list(range(rows))  # the request at each position of the batch (and of its KV cache)
            live = list(range(rows))  # the batch positions still sampling
            live_index = rows_index = inputs_B = torch.arange(rows, device=self.device)
            for step in range(max(caps)):
                all_live = len(live) == len(batch_rows)
                ids, lps = sampler.sample(logits_B_V if all_live else logits_B_V[live_index], rows_index, step)
                keep = []
                for position, token, lp in zip(live, ids.tolist(), lps.tolist(), strict=True):
                    row = batch_rows[position]
                    sampled[row].append(token)
                    logprobs[row].append(lp)
                    if token in stops[row]:
                        finish[row] = "stop"
                    elif len(sampled[row]) < caps[row]:
                        keep.append(position)
                if not keep:
                    break
                # Finished rows stay in the batch, re-reading their last token, until few enough rows are left
                # that dropping them is worth a copy of the KV cache: rows never attend to each other.
                inputs_B = ids if all_live else inputs_B.index_copy(0, live_index, ids)
                if len(keep) < len(live):
                    live = keep
                    if len(live) < _COMPACT_BELOW * len(batch_rows):
                        index = torch.tensor(live, device=self.device)
                        cache.batch_select_indices(index)
                        inputs_B, positions_B_1 = inputs_B[index], positions_B_1[index]
                        attention_B_T = attention_B_T[index]
                        batch_rows, live = [batch_rows[j] for j in live], list(range(len(live)))
                    live_index = torch.tensor(live, device=self.device)
                    rows_index = torch.tensor([batch_rows[j] for j in live], device=self.device)
                positions_B_1 = positions_B_1 + 1
                out = self.model(
                    input_ids=inputs_B.unsqueeze(1),
                    attention_mask=attention_B_T[:, : width + step + 1],
                    position_ids=positions_B_1,
                    past_key_values=cache,
                    use_cache=True,
                )
                cache, logits_B_V = out.past_key_values, out.logits[:, -1, :]
        return [
            Generation(tuple(sampled[i]), tuple(logprobs[i]), finish[i], policy_version=version) for i in range(rows)
        ]

    def _prefill(
        self, prompts: list[list[int]], new_tokens: int
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Run each distinct prompt once (a GRPO group repeats its prompt G times); give each row its prompt's state.

        Returns:
            ``(logits_B_V, cache, attention_B_T, positions_B_1)``: the next-token logits of each row, the KV cache
            (room for ``new_tokens`` more), the attention mask over the padded prompts followed by
            ``new_tokens`` ones (``T = width + new_tokens``), and each row's last prompt position.
        """
        import torch

        distinct: dict[tuple[int, ...], int] = {}
        row_prompt = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts])
        if self.share_prefix and len(distinct) > 1 and _preallocated_cache(self.model, 1) is not None:
            make_cache = functools.partial(_preallocated_cache, self.model)
            logits, cache, attention, positions = shared_prefill(
                self.model, list(distinct), new_tokens, self.pad_id, make_cache, bool(self._last_only)
            )
        else:
            input_ids, attention, positions = self._left_pad([list(p) for p in distinct])
            cache = _preallocated_cache(self.model, input_ids.shape[1] + new_tokens)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **self._last_only,
            )
            cache, logits = out.past_key_values, out.logits[:, -1, :]
            attention = torch.cat([attention, attention.new_ones(len(distinct), new_tokens)], dim=1)
            positions = positions[:, -1:]
        if len(distinct) < len(prompts):
            row_prompt = row_prompt.to(self.device)
            cache.batch_select_indices(row_prompt)
            logits, attention, positions = logits[row_prompt], attention[row_prompt], positions[row_prompt]
        return logits, cache, attention, positions

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask, position_ids)`` of shape ``(B, L)``, prompts right-aligned."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[row, width - len(prompt) :] = 1
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        return ids.to(self.device), attention.to(self.device), positions.to(self.device)


class _RowSampler:
    """Per-row sampling: each row has its own temperature, top-k, top-p and random stream.

    Sampling is by inverse CDF with one uniform number per row and step, drawn up front from the row's
    generator (seeded by the request), so a row's tokens do not depend on the rows beside it and one
    vectorized search replaces a ``multinomial`` call per row.
    """

    def __init__(self, params: Sequence[SamplingParams], caps: Sequence[int], rng: torch.Generator, device: Any):
        import torch

        self.greedy = torch.tensor([s.temperature == 0 for s in params], device=device)
        self.temperature = torch.tensor([s.temperature for s in params], device=device)
        # Greedy rows report the unfiltered distribution: filtering never changes the argmax.
        self.top_k = torch.tensor([0 if s.temperature == 0 else s.top_k for s in params], device=device)
        self.top_p = torch.tensor([1.0 if s.temperature == 0 else s.top_p for s in params], device=device)
        width = max(caps)
        uniforms = torch.zeros((len(params), width), dtype=torch.float64)
        for row, (s, cap) in enumerate(zip(params, caps, strict=True)):
            if s.temperature > 0:
                generator = torch.Generator().manual_seed(s.seed) if s.seed is not None else rng
                uniforms[row, :cap] = torch.rand(cap, generator=generator, dtype=torch.float64)
        self.uniforms = uniforms.to(device)

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``step``-th token of each of ``rows`` (indices of the rows still alive): ``(ids, logprobs)``."""
        import torch

        logprobs = sampling_logprobs(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows])
        cdf = logprobs.double().exp().cumsum(dim=-1)
        target = (self.uniforms[rows, step] * cdf[:, -1]).unsqueeze(-1)
        drawn = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
        ids = torch.where(self.greedy[rows], logprobs.argmax(dim=-1), drawn)
        return ids, logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


_COMPACT_BELOW = 0.75
"""Finished rows leave the batch (a copy of the KV cache) once fewer than this fraction of its rows still sample."""


def _preallocated_cache(model: Any, capacity: int) -> Any:
    """A KV cache that writes each step in place into buffers of ``capacity`` positions (they grow if need be).

    The model sees the same keys and values as in transformers' ``DynamicCache``, whose per-step ``torch.cat``
    copies the whole cache every token. None (the model makes its own cache) where the model has layers
    other than full attention (sliding windows, linear attention) or transformers has no per-layer caches.
    """
    layer_class = _buffered_layer_class()
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    if layer_class is None or not isinstance(count, int) or count < 1:
        return None
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])[:count]):
        return None
    from transformers.cache_utils import Cache

    return Cache(layers=[layer_class(capacity) for _ in range(count)])


@functools.cache
def _buffered_layer_class() -> type | None:
    """The cache layer of :func:`_preallocated_cache` (defined here so that importing this module stays light)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers before per-layer caches
        return None

    class BufferedLayer(DynamicLayer):  # type: ignore[misc, valid-type]
        """One layer's keys and values, ``(B, H, capacity, D)`` buffers; ``keys``/``values`` view the filled part."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            batch, heads, _, key_dim = key_states.shape
            self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_dim)
            self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
            self.length, self.is_initialized = 0, True
            self._view()

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.key_buffer.shape[-2]:
                self._resize(max(end, 2 * self.key_buffer.shape[-2]))
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            return self._view()

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Any) -> None:
            if self.is_initialized:
                self.key_buffer = self.key_buffer.index_select(0, indices.to(self.device))
                self.value_buffer = self.value_buffer.index_select(0, indices.to(self.device))
                self._view()

        def reorder_cache(self, beam_idx: Any) -> None:
            self.batch_select_indices(beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            keep = tokens_to_remove if tokens_to_remove > 0 else self.length + tokens_to_remove
            self.length = max(0, min(self.length, keep))
            if self.is_initialized:
                self._view()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
                self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
                self._view()

        def reset(self) -> None:
            self.length = 0
            if self.is_initialized:
                self._view()

        def _resize(self, capacity: int) -> None:
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)

        def _view(self) -> tuple[Any, Any]:
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]
            return self.keys, self.values

    return BufferedLayer


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id the model or tokenizer declares, tokenizer's first."""
    found: list[int] = []
    candidates: Iterable[Any] = (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(getattr(model, "config", None), "eos_token_id", None),
    )
    for value in candidates:
        for token in value if isinstance(value, list | tuple) else [value]:
            if isinstance(token, int) and token not in found:
                found.append(token)
    return found


def _parameters(fn: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
        return resolved
    return dtype
