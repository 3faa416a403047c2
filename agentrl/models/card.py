"""Model cards: the ``README.md`` that makes a checkpoint directory a Hub-ready model repository.

Every learner checkpoint is already what ``push_to_hub`` uploads: ``config.json``, safetensors weights,
``generation_config.json`` and the tokenizer with its chat template. :func:`write_model_card` adds the card,
built from what the directory and its run know:

- ``training_state.json`` (written by every learner): the learner, its config and the step;
- when the checkpoint sits in a run directory (``<run>/checkpoints/<phase>/step-NNNNNN``), the run's
  ``config.yaml`` (env, algorithm, the whole recipe) and ``metrics.jsonl`` (the phase's metrics at that step);
- evaluation results handed over by whoever measured them (``agentrl train`` adds each held-out evaluation).

The front matter is Hub metadata (``library_name: transformers``, ``pipeline_tag``, ``tags``, ``base_model``
when the starting model is a Hub id), rendered by ``huggingface_hub.ModelCardData``. The directory uploads
as it is (``hf upload <repo> <dir> .``; ``--exclude "training_state.*"`` leaves out the
optimizer state that only resuming needs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CARD_FILE", "model_card", "write_model_card"]

CARD_FILE = "README.md"
_STATE_JSON = "training_state.json"
_SHOWN = ("lr", "max_steps", "batch_size", "prompts_per_step", "group_size", "max_new_tokens", "max_turns",
          "temperature", "beta", "loss", "kl_coef", "max_seq_len", "lora_rank", "seed")  # fmt: skip


def write_model_card(
    path: str | os.PathLike[str], evaluation: Mapping[str, Any] | None = None, *, name: str | None = None
) -> Path:
    """Write ``<path>/README.md`` for the checkpoint at ``path`` (replacing one there).

    Args:
        path: a checkpoint directory (with ``training_state.json``), or any saved model directory.
        evaluation: ``{metric: value}`` measured on this model, e.g. ``{"pass@1": 0.42, "tasks": 300}``; kept
            in ``eval_results.json`` beside the card, so a later rewrite keeps it.
        name: the card's title when the directory is in no run directory; None: the directory's name.

    Returns:
        The card's path.
    """
    root = Path(path)
    if evaluation is not None:
        known = _read_json(root / "eval_results.json") or {}
        (root / "eval_results.json").write_text(json.dumps({**known, **evaluation}, indent=2) + "\n", encoding="utf-8")
    card = root / CARD_FILE
    card.write_text(model_card(root, name=name), encoding="utf-8")
    return card


def model_card(path: str | os.PathLike[str], *, name: str | None = None) -> str:
    """The model card text (Hub front matter, then Markdown) for the checkpoint at ``path`` (``name``: as in
    :func:`write_model_card`)."""
    from huggingface_hub import ModelCardData

    import agentrl

    root = Path(path)
    state = _read_json(root / _STATE_JSON) or {}
    meta = state.get("meta") or {}
    config = meta.get("config") or {}
    run_dir = _run_dir(root)
    run = _run_config(run_dir) if run_dir else {}
    learner = str(meta.get("learner") or run.get("algo") or _phase(root) or "agentrl")
    env = run.get("env") or config.get("env")
    start = str(config.get("model") or run.get("model") or "")
    tags = ["agentrl", "reinforcement-learning", learner, *([f"env:{env}"] if env else [])]
    auto, task = _kind(root)
    data = ModelCardData(library_name="transformers", pipeline_tag=task, tags=tags,
                         base_model=start if _is_hub_id(start) else None)  # fmt: skip
    step = state.get("step")
    metrics = _phase_metrics(run_dir, _phase(root), step) if run_dir else {}
    evaluation = _read_json(root / "eval_results.json") or {}
    name = run_dir.name if run_dir else name or root.name
    lines = [
        "---", data.to_yaml(), "---", "", f"# {name}", "",
        f"A model trained with agentrl {agentrl.__version__} ({learner}"
        + (f", step {step}" if step is not None else "") + (f", on the `{env}` environment" if env else "") + ").",
        "", "## Use", "", "```python", f"from transformers import {auto}, AutoTokenizer", "",
        f'model = {auto}.from_pretrained("<this repo or folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this repo or folder>")  # with the chat template it trained on',
        "```", "",
    ]  # fmt: skip
    lines += _recipe(learner, start, env, run, config)
    if evaluation:
        lines += ["## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_number(v)} |" for k, v in evaluation.items()] + [""]
    if metrics:
        lines += [f"## Training metrics at step {step}", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_number(v)} |" for k, v in metrics.items() if v is not None] + [""]
    lines += ["## Files", "",
              "`config.json`, `model.safetensors`, `generation_config.json` and the tokenizer files are the model. "
              "`training_state.pt` / `training_state.json` hold the optimizer state and step for resuming with "
              'agentrl; leave them out of an upload with `--exclude "training_state.*"`.', ""]  # fmt: skip
    return "\n".join(lines)


def _recipe(learner: str, start: str, env: Any, run: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    lines = ["## Training recipe", "", f"- learner: `{learner}`", f"- starting model: `{start or 'unknown'}`"]
    if env:
        kwargs = run.get("env_kwargs") or config.get("env_kwargs") or {}
        lines.append(f"- environment: `{env}`" + (f" with `{json.dumps(kwargs)}`" if kwargs else ""))
    shown = {k: config[k] for k in _SHOWN if config.get(k) is not None}
    if shown:
        lines.append("- " + ", ".join(f"{k} `{v}`" for k, v in shown.items()))
    if run:
        import yaml

        lines += ["", "<details><summary>The run's whole config (config.yaml)</summary>", "", "```yaml",
                  yaml.safe_dump(dict(run), sort_keys=False).rstrip(), "```", "", "</details>"]  # fmt: skip
    elif config:
        import yaml

        lines += ["", "<details><summary>The learner's config</summary>", "", "```yaml",
                  yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```", "", "</details>"]  # fmt: skip
    return [*lines, ""]


def _kind(root: Path) -> tuple[str, str | None]:
    """The ``transformers`` auto class and the Hub pipeline tag of the saved architecture."""
    architectures = (_read_json(root / "config.json") or {}).get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):  # reward models
        return "AutoModelForSequenceClassification", "text-classification"
    return "AutoModelForCausalLM", "text-generation"


def _run_dir(root: Path) -> Path | None:
    """``<run>`` when ``root`` is ``<run>/checkpoints/<phase>/step-NNNNNN`` of a run directory."""
    run = root.resolve().parent.parent.parent
    if root.resolve().parent.parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return run
    return None


def _phase(root: Path) -> str | None:
    return root.resolve().parent.name if _run_dir(root) else None


def _run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _phase_metrics(run_dir: Path, phase: str | None, step: Any) -> dict[str, Any]:
    """The phase's metrics record at ``step`` (or its last before it)."""
    from agentrl.tracking import read_metrics

    try:
        records = [r for r in read_metrics(run_dir, phase) if step is None or r.step <= int(step)]
    except (ValueError, TypeError):
        return {}
    return dict(records[-1].metrics) if records else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and not Path(model).exists()


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
