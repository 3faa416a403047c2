"""Weights for the ``vllm`` backend: the worker-side reload RPC, tensors across a process boundary, and
the checks that keep a bad update from reaching vLLM (a failed reload leaves layers on the meta device).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agentrl.errors import ConfigError

__all__ = [
    "WorkerExtension", "check_weights", "checkpoint_dtype", "checkpoint_shapes", "pack_tensor", "score_prompts",
    "unpack_tensor",
]  # fmt: skip


class WorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``) so weight reloads are a named RPC."""

    model_runner: Any

    def agentrl_reload_weights(self, named_tensors: Sequence[Sequence[Any]]) -> int:
        """Copy ``(name, tensor)`` pairs (checkpoint names, as in the HF state dict) into the model.

        From another process the tensors arrive packed as ``(name, dtype, shape, bytes)`` (see
        :func:`pack_tensor`), since vLLM's RPC encoding only rebuilds tensors where its types say so.

        Returns:
            How many tensors were loaded.
        """
        pairs = [
            (str(item[0]), unpack_tensor(*item[1:]) if len(item) == 4 else item[1]) for item in named_tensors
        ]
        self.model_runner.reload_weights(weights_iterator=iter(pairs))
        return len(pairs)


def pack_tensor(tensor: Any) -> tuple[str, list[int], bytes]:
    """``(dtype name, shape, raw bytes)`` of a tensor, for a process boundary that carries only plain data."""
    import torch

    cpu = tensor.detach().to("cpu").contiguous()
    return (
        str(cpu.dtype).removeprefix("torch."),
        list(cpu.shape),
        cpu.reshape(-1).view(torch.uint8).numpy().tobytes(),
    )


def unpack_tensor(dtype: str, shape: Sequence[int], data: bytes) -> Any:
    """The inverse of :func:`pack_tensor`."""
    import torch

    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(list(shape))
    )


def check_weights(
    pairs: Sequence[tuple[str, Any]], shapes: Mapping[str, tuple[int, ...]], optional: set[str]
) -> None:
    """Check a weight update against the model's parameter ``shapes`` (all required but ``optional``).

    Raises:
        ConfigError: unknown names, wrong shapes, or required names missing (each listed, a few at most).
    """
    if not shapes:  # the architecture is not one transformers can describe: vLLM checks what it can
        return
    given = {name: tuple(tensor.shape) for name, tensor in pairs}
    unknown = sorted(set(given) - set(shapes))
    wrong = sorted(
        f"{n} {given[n]} != {shapes[n]}" for n in set(given) & set(shapes) if given[n] != shapes[n]
    )
    missing = sorted(set(shapes) - set(given) - optional)
    problems = [
        f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
        for label, names in (("unknown names", unknown), ("wrong shapes", wrong), ("missing", missing))
        if names
    ]
    if problems:
        raise ConfigError(
            f"update_weights: the weights do not fit the model ({'; '.join(problems)}). Pass the learner's "
            "full state dict (e.g. model.state_dict()) with the checkpoint's parameter names; vLLM reloads "
            "every layer, so a partial update is not possible."
        )


def checkpoint_shapes(resolved: str) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """``({name: shape}, optional names)`` of the checkpoint's transformers model, built on the meta device.

    Optional: tied weights (an LM head sharing the embedding). Empty when transformers cannot build it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(resolved)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        return {}, set()
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = {name for name in shapes if name.startswith("lm_head.")} if config.tie_word_embeddings else set()
    return shapes, tied


def checkpoint_dtype(resolved: str) -> str:
    """The dtype the checkpoint's config names (``"auto"`` when it names none)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError):
        return "auto"  # vLLM reports the loading problem itself
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


def score_prompts(engine: Any, sequences: Sequence[Sequence[int]], prefix: str) -> list[list[float]]:
    """Each token's untempered logprob given the ones before it (from the second on): vLLM's prompt logprobs,
    run to completion on ``engine`` (an ``LLMEngine`` with no request of its own running)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
    keys = [f"{prefix}-{i}" for i in range(len(sequences))]
    for key, row in zip(keys, sequences, strict=True):
        engine.add_request(key, TokensPrompt(prompt_token_ids=list(row)), params)
    finished: dict[str, Any] = {}
    while len(finished) < len(keys):
        finished.update({o.request_id: o for o in engine.step() if o.finished and o.request_id in keys})
    return [
        [float(entry[token].logprob) for entry, token in zip(finished[key].prompt_logprobs[1:], row[1:], strict=True)]
        for key, row in zip(keys, sequences, strict=True)
    ]
