"""One judge described as data: what a run config, ``agentrl eval --best-of-n-by judge:<file>`` or a recipe
names, built into a :class:`~agentrl.judge.judge.Judge` by :meth:`JudgeConfig.build`.

Example ``judge.yaml``::

    model: Qwen/Qwen2.5-7B-Instruct      # a directory or hub id (hf backend) ...
    # base_url: http://127.0.0.1:8000/v1 # ... or the served model's name behind an OpenAI-compatible server
    rubric: Does the function solve the task? Penalise code that only prints the expected output.
    scale: [1, 10]
    max_tokens: 512
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentrl.errors import ConfigError
from agentrl.judge import verdicts as _v

__all__ = ["JudgeConfig", "load_judge_config"]


class JudgeConfig(BaseModel):
    """How to build a judge; every field but ``model`` has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="a model directory or hub id; with base_url, the served model's name")
    base_url: str | None = Field(
        None, description="an OpenAI-compatible API root (…/v1); None: local hf backend"
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    device: str = Field("cpu", description="device of a local judge, e.g. 'cpu' or 'cuda'")
    template: str | None = Field(
        None, description="chat template of a local judge: None (its own) or 'chatml'"
    )
    rubric: str = Field(_v.DEFAULT_RUBRIC, description="what a good response is")
    scale: tuple[int, int] = Field((1, 10), description="integer range of pointwise scores")
    pointwise_template: str = Field(_v.POINTWISE_TEMPLATE, description="the pointwise question")
    pairwise_template: str = Field(_v.PAIRWISE_TEMPLATE, description="the pairwise question")
    system: str | None = Field(_v.SYSTEM_PROMPT, description="the judge's system message (None: none)")
    max_tokens: int = Field(256, ge=1, description="the most tokens of one verdict")
    temperature: float = Field(0.0, ge=0, description="0: greedy (reproducible, cacheable verdicts)")
    timeout_s: float | None = Field(60.0, gt=0, description="the most seconds one call may take")
    retries: int = Field(2, ge=0, description="further attempts of a failed call")
    cache: str | None = Field(None, description="a JSONL file of cached answers (None: in memory)")

    def build(self, cache: str | Path | None = None) -> Any:
        """The :class:`~agentrl.judge.judge.Judge` (``cache`` overrides the config's)."""
        import os

        from agentrl.judge.judge import Judge
        from agentrl.rollout.policy import SamplingParams

        options: dict[str, Any] = {
            "rubric": self.rubric, "scale": self.scale, "pointwise_template": self.pointwise_template,
            "pairwise_template": self.pairwise_template, "system": self.system, "timeout_s": self.timeout_s,
            "retries": self.retries, "cache": cache if cache is not None else self.cache,
            "sampling": SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature),
        }  # fmt: skip
        if self.base_url is not None:
            key = os.environ.get(self.api_key_env)
            return Judge.from_endpoint(self.base_url, self.model, api_key=key, **options)
        return Judge.from_pretrained(self.model, device=self.device, template=self.template, **options)


def load_judge_config(source: str | Path | dict[str, Any], **defaults: Any) -> JudgeConfig:
    """A :class:`JudgeConfig` from a mapping, a YAML/JSON file, or a bare model directory / hub id.

    Raises:
        ConfigError: an unreadable file or an invalid field (the message names it).
    """
    data: Any
    if isinstance(source, dict):
        data = source
    elif str(source).endswith((".yaml", ".yml", ".json")):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(
                f"judge config {path} does not exist; give a YAML/JSON file or a model directory"
            )
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ConfigError(f"judge config {path} must hold a mapping of JudgeConfig fields")
    else:
        data = {"model": str(source)}
    try:
        return JudgeConfig(**{**defaults, **data})
    except ValidationError as error:
        from agentrl._config_keys import model_keys, unknown_key_message

        problems = [
            unknown_key_message(".".join(map(str, e["loc"])), list(JudgeConfig.model_fields), model_keys(JudgeConfig))
            if e["type"] == "extra_forbidden" else f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in error.errors()
        ]  # fmt: skip
        raise ConfigError(f"invalid judge config: {'; '.join(problems)}") from None
