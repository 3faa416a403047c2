"""Harbor task folders as agentrl envs: ``agentrl.make("harbor:path/to/task-or-dataset")``.

A Harbor task (the format of Terminal-Bench 2 and Harbor's SWE-bench adapters) is a folder::

    task.toml         [agent] timeout_sec, [verifier] timeout_sec, [environment] cpus, memory_mb,
                      allow_internet, docker_image (prebuilt; else environment/ is built), [metadata]
    instruction.md    what the agent is asked (its first user message)
    environment/      the container's build context (a Dockerfile); its WORKDIR is where the agent starts
    tests/test.sh     the verifier, run after the agent: it writes /logs/verifier/reward.txt (one number)
                      or /logs/verifier/reward.json (named numbers)
    solution/solve.sh optional reference solution (what Harbor's oracle agent runs)

The ``harbor`` package itself needs Python >= 3.12, so this module reads that layout directly, following
Harbor's documented task schema (``TaskConfig`` in harbor's ``models/task/config.py``), without the package.

How a task runs here: the task's image is built locally (no registry) and extended by one layer that links
``/app``-style WORKDIRs, ``/tests`` and ``/logs`` into the sandbox's writable work dir, because the docker
sandbox runs every container with a read-only root as an unprivileged user (uid 65534). Each episode gets a
fresh container (the ``docker`` sandbox backend, with its limits, seccomp profile and reaper); the agent
acts through a ``bash`` tool (Hermes ``<tool_call>`` blocks); a turn without a tool call ends the episode.
Then ``tests/`` is copied to ``/tests`` and ``tests/test.sh`` runs under ``[verifier] timeout_sec``; its
reward file is the outcome reward. Differences from Harbor: the verifier runs as the unprivileged user, not
root; the image needs ``/usr/bin/python3`` (the sandbox's supervisor) and ``bash``; docker-compose
environments are not supported.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentrl.core import Env, ResetResult, StepResult
from agentrl.errors import ConfigError, MissingDependencyError, ToolCallError
from agentrl.tools import Tool, parse_tool_calls, tool_error_message, validate_call
from agentrl.types import Message

__all__ = ["HarborEnv", "HarborTask", "load_harbor_env", "load_tasks", "parse_reward"]

HARBOR = "/tmp/.harbor"
"""Where the writable copies of the task's paths live inside the container (the sandbox's work dir)."""
_MiB = 1 << 20
SYSTEM_PROMPT = (
    "You work in a Linux container. Call the bash tool to run commands; reply without a tool call when the "
    "task is done."
)


@dataclass(frozen=True)
class HarborTask:
    """One Harbor task folder, parsed.

    Attributes:
        path: the folder.
        name: ``[task] name`` or the folder's name.
        instruction: ``instruction.md``.
        config: ``task.toml`` as a dict.
        solution: ``solution/solve.sh``, or None.
    """

    path: Path
    name: str
    instruction: str
    config: Mapping[str, Any] = field(default_factory=dict)
    solution: str | None = None

    def section(self, name: str) -> Mapping[str, Any]:
        value = self.config.get(name) or {}
        return value if isinstance(value, Mapping) else {}

    def timeout(self, section: str, default: float) -> float:
        value = self.section(section).get("timeout_sec")
        return float(value) if isinstance(value, (int, float)) and value > 0 else default


def _toml() -> Any:
    import importlib

    try:
        return importlib.import_module("tomllib")
    except ImportError:  # Python 3.10
        try:
            return importlib.import_module("tomli")
        except ImportError as exc:
            raise MissingDependencyError("reading task.toml on Python 3.10 needs: pip install tomli") from exc


def _read_task(path: Path) -> HarborTask:
    missing = [p for p in ("task.toml", "instruction.md", "tests/test.sh") if not (path / p).is_file()]
    if missing:
        raise ConfigError(f"{path} is not a Harbor task folder: missing {', '.join(missing)}")
    toml = _toml()
    try:
        config = toml.loads((path / "task.toml").read_text())
    except toml.TOMLDecodeError as exc:
        raise ConfigError(f"{path / 'task.toml'}: {exc}") from exc
    if not (path / "environment" / "Dockerfile").is_file() and not config.get("environment", {}).get(
        "docker_image"
    ):
        raise ConfigError(f"{path}: no environment/Dockerfile and no [environment] docker_image in task.toml")
    solve = path / "solution" / "solve.sh"
    name = (config.get("task") or {}).get("name") or path.name
    return HarborTask(path, str(name), (path / "instruction.md").read_text().strip(), config,
                      solve.read_text() if solve.is_file() else None)  # fmt: skip


def load_tasks(target: str | Path) -> list[HarborTask]:
    """A task folder, or a dataset folder whose sub-folders are tasks (sorted by name).

    Raises:
        ConfigError: the path does not exist, or holds no task folder.
    """
    root = Path(target).expanduser()
    if not root.is_dir():
        raise ConfigError(f"no Harbor task folder at {str(root)!r}; give a task folder or a folder of tasks")
    if (root / "task.toml").is_file():
        return [_read_task(root)]
    tasks = [_read_task(p) for p in sorted(root.iterdir()) if (p / "task.toml").is_file()]
    if not tasks:
        raise ConfigError(
            f"{root} holds no Harbor task (a folder with task.toml, instruction.md, tests/test.sh)"
        )
    return tasks


def parse_reward(text_file: str | None, json_file: str | None) -> tuple[dict[str, float], dict[str, float]]:
    """Harbor's reward files as ``(reward components, other metrics)``.

    ``reward.txt`` (one number) wins, as in Harbor; else ``reward.json``: its ``"reward"`` entry is the
    reward and the rest are metrics, or, without a ``"reward"`` entry, every entry is a component.

    Raises:
        ValueError: neither file holds a finite number.
    """
    if text_file and text_file.strip():
        return {"tests": _finite(float(text_file.strip()))}, {}
    if json_file and json_file.strip():
        data = json.loads(json_file)
        if not isinstance(data, Mapping):
            raise ValueError(f"reward.json holds {type(data).__name__}, not an object of numbers")
        numbers = {str(k): _finite(float(v)) for k, v in data.items() if isinstance(v, (int, float))}
        if "reward" in numbers:
            return {"tests": numbers.pop("reward")}, numbers
        return numbers, {}
    raise ValueError("the tests wrote neither /logs/verifier/reward.txt nor /logs/verifier/reward.json")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"reward {value} is not finite")
    return value


def bash(command: str) -> str:
    """Run a bash command in the task's container and return its exit code and output.

    Args:
        command: the command line, run with bash in the task's working directory.
    """
    raise NotImplementedError  # the schema only: HarborEnv runs the command in the episode's sandbox


BASH_TOOL = Tool.from_function(bash)
# The derived layer: the task's WORKDIR, /tests and /logs become links into the sandbox's writable work dir.
_LAYER = """FROM {image}
USER root
RUN set -e; w={workdir}; if [ -n "$w" ] && [ "$w" != / ] && [ -d "$w" ]; then \\
      mkdir -p /opt/harbor-workdir && cp -a "$w"/. /opt/harbor-workdir/ && rm -rf "$w" && ln -s {harbor}/workdir "$w"; \\
    fi; rm -rf /tests /logs; ln -s {harbor}/tests /tests; ln -s {harbor}/logs /logs
"""


class HarborEnv(Env):
    """Harbor tasks in the docker sandbox, acted on through a ``bash`` tool (see the module docstring).

    Args:
        target: a task folder, or a folder of task folders.
        command_timeout: seconds one ``bash`` call may run.
        max_turns: assistant turns before the episode is truncated (the tests still run).
        output_chars: characters of a command's output shown to the agent.
        docker_options: extra options for the docker sandbox (e.g. ``runtime="runsc"``).

    Raises:
        ConfigError: the target holds no valid task folder.
    """

    def __init__(self, target: str | Path, *, command_timeout: float = 60.0, max_turns: int = 20,
                 output_chars: int = 8000, docker_options: Mapping[str, Any] | None = None):  # fmt: skip
        self.tasks = load_tasks(target)
        self.command_timeout, self.output_chars = command_timeout, output_chars
        self.max_turns: int = max_turns
        self.docker_options = dict(docker_options or {})
        self.tools = (BASH_TOOL.schema(),)
        self.description = (
            f"Harbor tasks from {target} ({len(self.tasks)} task{'s' * (len(self.tasks) != 1)})"
        )
        self._images: dict[Path, tuple[str, str]] = {}
        self._sandbox: Any = None
        self._task: HarborTask | None = None
        self._workdir = HARBOR
        self._turn = 0

    # ---- images ----------------------------------------------------------------------------------
    def image(self, task: HarborTask) -> tuple[str, str]:
        """Build (once) the task's image and its sandbox layer; returns ``(tag, working dir)``."""
        if task.path not in self._images:
            self._images[task.path] = _build(task)
        return self._images[task.path]

    # ---- episode ---------------------------------------------------------------------------------
    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        await self._close_sandbox()
        await super().areset(seed=seed)
        options = options or {}
        index = options.get("task", options.get("task_index"))
        if index is None:
            index = int(self.np_random.integers(0, len(self.tasks)))
        if not isinstance(index, int) or not 0 <= index < len(self.tasks):
            raise ConfigError(f"task {index!r}: this env has tasks 0..{len(self.tasks) - 1}")
        task = self._task = self.tasks[index]
        tag, workdir = await asyncio.to_thread(self.image, task)
        self._sandbox = await _open(task, tag, self.docker_options)
        start = f"mkdir -p {HARBOR}/workdir {HARBOR}/tests {HARBOR}/logs/verifier {HARBOR}/logs/agent && " + (
            f"cp -R --preserve=mode,timestamps /opt/harbor-workdir/. {HARBOR}/workdir/" if workdir else "true"
        )
        result = await self._sandbox.exec(["bash", "-c", start], timeout=120)
        if not result.ok:
            raise ConfigError(
                f"Harbor task {task.name!r}: preparing the container failed: {result.stderr[-500:]}"
            )
        self._workdir, self._turn = workdir or f"{HARBOR}/workdir", 0
        opening: list[Message] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": task.instruction},
        ]
        return ResetResult(opening, {"tools": self.tool_schemas(), "task_index": index, "task": task.name})

    async def astep(self, action: str) -> StepResult:
        if self._sandbox is None or self._task is None:
            raise RuntimeError("call reset() before step()")
        self._turn += 1
        parsed = parse_tool_calls(action)
        observation: list[Message] = [tool_error_message(error) for error in parsed.errors]
        for call in parsed.calls:
            try:
                call = validate_call(call, [BASH_TOOL])
            except ToolCallError as invalid:
                observation.append(tool_error_message(invalid, call.id))
                continue
            content = await self.run_command(str(call.arguments["command"]))
            observation.append(
                {"role": "tool", "content": content, "tool_call_id": call.id or "", "name": "bash"}
            )
        done = not parsed.calls and not parsed.errors
        truncated = not done and self._turn >= self.max_turns
        if not (done or truncated):
            return StepResult(observation, 0.0, False, False, {"reward_components": {}})
        components, metrics, error = await self.verify()
        info: dict[str, Any] = {"reward_components": components, "metrics": metrics}
        if error:
            info["verifier_error"] = error
        await self._close_sandbox()
        return StepResult(observation, sum(components.values()), done, truncated, info)

    async def run_command(self, command: str) -> str:
        """Run one agent command in the episode's container; the text the agent sees."""
        script = f"cd {shlex.quote(self._workdir)} && {command}"
        result = await self._sandbox.exec(["bash", "-c", script], timeout=self.command_timeout)
        output = (result.stdout + result.stderr)[-self.output_chars :]
        status = "timed out" if result.timed_out else f"exit code {result.exit_code}"
        return f"[{status}]\n{output}"

    async def verify(self) -> tuple[dict[str, float], dict[str, float], str | None]:
        """Copy ``tests/`` in, run ``tests/test.sh``, read the reward file (0 with the reason if none)."""
        assert self._task is not None and self._sandbox is not None
        tests = self._task.path / "tests"
        files = {
            f".harbor/tests/{p.relative_to(tests)}": p.read_bytes() for p in tests.rglob("*") if p.is_file()
        }
        variables = self._task.section("verifier").get("env") or {}
        assign = "".join(f"{k}={shlex.quote(str(v))} " for k, v in variables.items())
        # A reward file the agent wrote must not count: only what test.sh writes is the grade.
        clear = f"rm -f {HARBOR}/logs/verifier/reward.txt {HARBOR}/logs/verifier/reward.json"
        script = f"{clear} && cd {shlex.quote(self._workdir)} && {assign}bash /tests/test.sh"
        timeout = self._task.timeout("verifier", 600.0)
        result = await self._sandbox.exec(["bash", "-c", script], files=files, timeout=timeout)
        reads = ["cat", f"{HARBOR}/logs/verifier/reward.txt"], ["cat", f"{HARBOR}/logs/verifier/reward.json"]
        text, data = [
            (r.stdout if r.ok else None) for r in [await self._sandbox.exec(list(c)) for c in reads]
        ]
        try:
            components, metrics = parse_reward(text, data)
            return components, metrics, None
        except ValueError as exc:
            tail = (result.stdout + result.stderr)[-800:]
            return {"tests": 0.0}, {}, f"{exc}; test.sh exit code {result.exit_code}: {tail}"

    def demonstration_actions(self, task_index: int) -> tuple[str, ...]:
        """The reference episode: run ``solution/solve.sh`` through the bash tool, then finish.

        Raises:
            ConfigError: the task has no ``solution/solve.sh``.
        """
        task = self.tasks[task_index]
        if task.solution is None:
            raise ConfigError(f"Harbor task {task.name!r} has no solution/solve.sh")
        call = {
            "name": "bash",
            "arguments": {"command": f"bash <<'HARBOR_SOLUTION'\n{task.solution}\nHARBOR_SOLUTION"},
        }
        return (f"<tool_call>\n{json.dumps(call)}\n</tool_call>", "Done.")

    def demonstration(self, task: int) -> list[Message]:
        """The reference episode of task ``task`` played in a fresh container (real tool output), for SFT."""
        messages = list(self.reset(seed=0, options={"task": task}).observation)
        for action in self.demonstration_actions(task):
            messages.append({"role": "assistant", "content": action})
            step = self.step(action)
            messages.extend(step.observation)
            if step.terminated or step.truncated:
                break
        return messages

    async def _close_sandbox(self) -> None:
        sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            await sandbox.close()

    async def aclose(self) -> None:
        await self._close_sandbox()
        await super().aclose()


def load_harbor_env(target: str, **kwargs: Any) -> HarborEnv:
    """The ``harbor:`` loader: ``target`` is a task folder or a folder of task folders."""
    return HarborEnv(target, **kwargs)


async def _open(task: HarborTask, tag: str, options: Mapping[str, Any]) -> Any:
    from agentrl.sandbox import SandboxLimits, open_sandbox

    env = task.section("environment")
    limits = SandboxLimits(
        wall_time=max(task.timeout("verifier", 600.0), 60.0),
        cpu_time=max(task.timeout("verifier", 600.0), 60.0),
        memory=int(env.get("memory_mb", 2048)) * _MiB,
        cpus=float(env.get("cpus", 1)),
        disk=min(int(env.get("storage_mb", 1024)), 4096) * _MiB,
        processes=256,
        network=bool(env.get("allow_internet", False)),
    )
    sandbox = open_sandbox("docker", limits, image=tag, keep_workdir=True, **options)
    await sandbox.start()
    return sandbox


def _context_hash(task: HarborTask) -> str:
    digest = hashlib.sha256(_LAYER.encode())
    context = task.path / "environment"
    for p in sorted(context.rglob("*")) if context.is_dir() else ():
        if p.is_file():
            digest.update(str(p.relative_to(context)).encode() + b"\0" + p.read_bytes())
    digest.update(str(task.section("environment").get("docker_image")).encode())
    return digest.hexdigest()[:12]


def _build(task: HarborTask) -> tuple[str, str]:
    """Build the task's image (or take its prebuilt ``docker_image``) and the sandbox layer on top."""
    import io

    import docker
    import docker.errors

    client = docker.from_env()
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in task.name.lower()).strip("-.") or "task"
    tag = f"agentrl-harbor/{slug}:{_context_hash(task)}"
    try:
        try:
            image = client.images.get(tag)
        except docker.errors.ImageNotFound:
            base = task.section("environment").get("docker_image")
            if not base:
                base = f"agentrl-harbor/{slug}-env:{_context_hash(task)}"
                client.images.build(path=str(task.path / "environment"), tag=base, rm=True, forcerm=True)
            workdir = client.images.get(base).attrs["Config"].get("WorkingDir") or ""
            layer = _LAYER.format(image=base, workdir=shlex.quote(workdir), harbor=HARBOR)
            client.images.build(fileobj=io.BytesIO(layer.encode()), tag=tag, rm=True, forcerm=True,
                                labels={"agentrl.harbor.workdir": workdir})  # fmt: skip
            image = client.images.get(tag)
    except (docker.errors.BuildError, docker.errors.APIError) as exc:
        raise ConfigError(f"Harbor task {task.name!r}: building its image failed: {exc}") from exc
    finally:
        client.close()
    workdir = (image.labels or {}).get("agentrl.harbor.workdir", "")
    return tag, workdir if workdir not in ("", "/") else ""
