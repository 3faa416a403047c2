"""vLLM on a CPU without vector instructions: keep ``torch.compile`` off.

Even with ``enforce_eager`` (the model runs uncompiled), vLLM's sampler wraps small helpers in
``torch.compile(backend="inductor")`` (``batched_count_greater_than`` for logprob ranks, ``compiled_random_sample``),
and inductor builds them as C++ with the system compiler. Where torch runs without AVX2/AVX-512 (an old or
emulated x86 CPU, or ``ATEN_CPU_CAPABILITY=default``), that build gains nothing, needs a C++ compiler, and in
torch 2.13 can fail outright: inductor's FX-graph cache does not key on the instruction set it vectorized for, so
a kernel cached by an AVX-512 process is rebuilt without AVX flags (``CppCompileError: 'at::vec' has not been
declared``). torch's own switch turns that off: ``torch._dynamo.config.disable`` makes ``torch.compile``'d functions
run eagerly. A process reads it from ``TORCH_COMPILE_DISABLE=1`` at start-up; set later, it holds only in the
thread that set it (torch keeps config values per thread), so an in-process engine sets it in the threads that
step vLLM.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from collections.abc import Iterator

__all__ = ["DISABLE_VARIABLE", "compile_blocker", "compile_off", "log_once", "vllm_cpu_env"]

_CAPABILITY_VARIABLE = "ATEN_CPU_CAPABILITY"
DISABLE_VARIABLE = "TORCH_COMPILE_DISABLE"
_VECTOR_X86 = frozenset({"AVX2", "AVX512"})

logger = logging.getLogger(__name__)


def compile_blocker(
    capability: str | None = None, machine: str | None = None, variable: str | None = None
) -> str | None:
    """Why ``torch.compile`` should stay off for vLLM on this CPU, or None when it may run.

    Args:
        capability: torch's view of the CPU (``torch.backends.cpu.get_cpu_capability()``); None: ask torch.
        machine: the architecture (``platform.machine()``); None: this machine's.
        variable: the ``ATEN_CPU_CAPABILITY`` setting; None: this process's environment.

    Returns:
        A reason to print (it names the setting or the capability), or None.
    """
    variable = os.environ.get(_CAPABILITY_VARIABLE, "") if variable is None else variable
    if variable.strip().lower() == "default":
        return f"{_CAPABILITY_VARIABLE}=default (torch uses no vector instructions)"
    machine = platform.machine() if machine is None else machine
    if machine not in ("x86_64", "AMD64"):  # others vectorize on their own terms (NEON, SVE, VSX)
        return None
    if capability is None:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    if capability.upper() not in _VECTOR_X86:
        return f"torch sees this x86 CPU as {capability!r}, without AVX2 or AVX-512"
    return None


@functools.cache
def log_once(reason: str, where: str) -> None:
    """Say, once per process and place, that ``torch.compile`` is off and why."""
    logger.warning("torch.compile is off %s: %s", where, reason)


def vllm_cpu_env() -> dict[str, str]:
    """Environment variables for a vLLM CPU process started from here (e.g. ``vllm serve``).

    Returns:
        ``{"TORCH_COMPILE_DISABLE": "1"}`` where :func:`compile_blocker` gives a reason (logged once), else ``{}``.
    """
    reason = compile_blocker()
    if reason is None:
        return {}
    log_once(reason, "for the vLLM server")
    return {DISABLE_VARIABLE: "1"}


@contextlib.contextmanager
def compile_off(off: bool) -> Iterator[None]:
    """Run the block with ``torch.compile`` off in the calling thread where ``off`` (else change nothing).

    torch keeps a set config value per thread, so this reaches only vLLM's steps run in this thread, and the
    previous setting comes back after the block.
    """
    if not off:
        yield
        return
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield
