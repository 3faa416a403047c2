"""Data sets through one loader (agentrl.data.sources.load_records): JSONL, JSON lists, Parquet, Arrow, CSV,
``save_to_disk`` directories and ``load_dataset`` directories, with column mapping, read by the real
``datasets`` package; and the places that read them: ToolEnv tasks (extra columns kept as metadata), SFT
conversations, preference pairs, HumanEval/MBPP tasks, the ``sft`` command and the pipeline's ``sft.data``.

A Hub id goes through the same ``load_dataset`` call, but no hub is reachable here: only its error is tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentrl.data.sources import check_source, load_records, parse_columns
from agentrl.errors import ConfigError

datasets = pytest.importorskip("datasets")

ASK = [{"role": "user", "content": "What is 2 + 3?"}]
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}  # fmt: skip
CONVERSATIONS = [
    [*ASK, CALL, {"role": "tool", "content": "5"}, {"role": "assistant", "content": "<answer>5</answer>"}],
    [*ASK, {"role": "assistant", "content": "<answer>5</answer>"}],
]
ROWS = [{"question": "What is 2 + 3?", "solution": "5", "level": 1, "source": "hand"},
        {"question": "What is 7 + 8?", "solution": "15", "level": 2, "source": "hand"}]  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_every_local_format_reads_the_same_rows(tmp_path, offline):
    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.to_csv(str(tmp_path / "rows.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    sources = [_write_jsonl(tmp_path / "rows.jsonl", ROWS), tmp_path / "list.json", tmp_path / "rows.parquet",
               tmp_path / "saved", arrow, table]  # fmt: skip
    for source in sources:
        assert load_records(source) == ROWS, source
    typed = [{**row, "solution": int(row["solution"])} for row in ROWS]  # CSV has no types: "5" reads as 5
    assert load_records(tmp_path / "rows.csv") == typed
    assert load_records(tmp_path / "rows.parquet", limit=1) == ROWS[:1]


def test_splits_of_a_saved_dict_and_of_a_data_folder(tmp_path, offline):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                                   "test": datasets.Dataset.from_list(ROWS[1:])})  # fmt: skip
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_records(tmp_path / "dict", split="test") == ROWS[1:]
    with pytest.raises(ConfigError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        load_records(tmp_path / "dict", split="validation")
    folder = tmp_path / "folder"  # a data set repository's layout: load_dataset finds the splits by file name
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", ROWS[:1])
    _write_jsonl(folder / "test.jsonl", ROWS[1:])
    assert load_records(folder, split="test") == ROWS[1:]


def test_column_mapping_renames_and_keeps_the_rest(tmp_path):
    rows = load_records(_write_jsonl(tmp_path / "t.jsonl", ROWS), columns={"prompt": "question", "answer": "solution"})
    assert rows[0] == {"prompt": "What is 2 + 3?", "answer": "5", "level": 1, "source": "hand"}
    with pytest.raises(ConfigError, match=r"no column 'questoin' \(did you mean 'question'\?\).*'level'"):
        load_records(tmp_path / "t.jsonl", columns={"prompt": "questoin"})
    assert parse_columns("prompt=question, answer=solution") == {"prompt": "question", "answer": "solution"}
    with pytest.raises(ConfigError, match="field=column"):
        parse_columns("prompt")


def test_bad_sources_are_named(tmp_path, offline):
    with pytest.raises(ConfigError, match="does not exist"):
        load_records(tmp_path / "missing.parquet")
    with pytest.raises(ConfigError, match=r"unknown data file type '\.txt'"):
        load_records(_write_jsonl(tmp_path / "rows.txt", ROWS))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: a list, not an object"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match=r"cannot load data set 'nobody/no-such-set'.*HF_HUB_OFFLINE"):
        load_records("nobody/no-such-set")  # a Hub id: offline here, so its error
    check_source("nobody/no-such-set", "--data")  # a Hub id is not checked locally
    with pytest.raises(ConfigError, match=r"--data \./none\.jsonl does not exist"):
        check_source("./none.jsonl", "--data")


def test_arrow_nulls_are_dropped_from_messages_and_jsonl_is_read_as_written(tmp_path):
    rows = [{"messages": m} for m in CONVERSATIONS]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    raw = datasets.load_dataset("parquet", data_files=str(tmp_path / "c.parquet"), split="train").to_list()
    assert raw[1]["messages"][0]["tool_calls"] is None  # what Arrow's schema does to a message without one
    assert load_records(tmp_path / "c.parquet") == rows  # read back as written
    assert load_records(_write_jsonl(tmp_path / "c.jsonl", rows)) == rows


def test_tool_env_keeps_extra_columns_as_task_metadata(tmp_path):
    from agentrl.toolenv import ToolEnv

    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: the first.
            b: the second.
        """
        return a + b

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "tasks.parquet"))
    tasks = load_records(tmp_path / "tasks.parquet", columns={"prompt": "question", "answer": "solution"})
    seen = []

    def reward(task, answer):
        seen.append(task.data)
        return float(answer == task.answer) * task.data["level"]

    env = ToolEnv([add], tasks, reward)
    assert env.tasks[1].data == {"level": 2, "source": "hand"} and env.tasks[1].answer == "15"
    env.reset(seed=0, options={"task": 1})
    result = env.step("<answer>15</answer>")
    assert result.terminated and result.reward == pytest.approx(2.0)
    assert seen == [{"level": 2, "source": "hand"}]
    env.close()


def test_sft_conversations_from_parquet_with_mapped_columns_and_trl_prompt_completion(tmp_path):
    from agentrl.learners.sft import read_messages

    rows = [{"conversation": m, "tools": []} for m in CONVERSATIONS]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "sft.parquet"))
    demos = read_messages(tmp_path / "sft.parquet", columns={"messages": "conversation"})
    assert [list(d.messages) for d in demos] == CONVERSATIONS
    trl = [{"prompt": ASK, "completion": [{"role": "assistant", "content": "<answer>5</answer>"}]}]
    assert list(read_messages(_write_jsonl(tmp_path / "pc.jsonl", trl))[0].messages) == CONVERSATIONS[1]
    with pytest.raises(ConfigError, match=r"sft.parquet row 1: expected .*it has \['conversation', 'tools'\]"):
        read_messages(tmp_path / "sft.parquet")


def test_preferences_in_trl_forms(tmp_path):
    from agentrl.learners.preference_data import PreferenceConversation, read_preferences

    good, bad = {"role": "assistant", "content": "5"}, {"role": "assistant", "content": "6"}
    rows = [
        {"question": "What is 2 + 3?", "better": "5", "worse": "6"},  # TRL's standard form, mapped columns
        {"chosen": [*ASK, good], "rejected": [*ASK, bad]},  # TRL's implicit prompt
    ]
    datasets.Dataset.from_list(rows[:1]).to_parquet(str(tmp_path / "p.parquet"))
    (standard,) = read_preferences(tmp_path / "p.parquet",
                                   columns={"prompt": "question", "chosen": "better", "rejected": "worse"})  # fmt: skip
    assert standard == PreferenceConversation(tuple(ASK), (good,), (bad,))
    (implicit,) = read_preferences(_write_jsonl(tmp_path / "i.jsonl", rows[1:]))
    assert implicit == PreferenceConversation(tuple(ASK), (good,), (bad,))


HUMANEVAL_ROW = {
    "task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """Add a and b."""\n', "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add",
}  # fmt: skip


def test_humaneval_and_mbpp_from_parquet_and_a_saved_dict(tmp_path, offline):
    from agentrl_envs.code_sandbox.datasets import load_humaneval, load_mbpp, load_tasks

    datasets.Dataset.from_list([HUMANEVAL_ROW]).to_parquet(str(tmp_path / "he.parquet"))
    (task,) = load_humaneval(tmp_path / "he.parquet")
    assert task.task_id == "HumanEval/0" and task.entry_point == "add" and task.tests.check == "check"
    assert load_tasks(tmp_path / "he.parquet") == [task]
    mbpp = {"task_id": 2, "prompt": "Add two numbers.", "code": "def add(a, b):\n    return a + b",
            "test_list": ["assert add(1, 2) == 3"], "test_imports": []}  # fmt: skip
    datasets.DatasetDict({"test": datasets.Dataset.from_list([mbpp])}).save_to_disk(str(tmp_path / "mbpp"))
    (task,) = load_mbpp(tmp_path / "mbpp")  # the split HumanEval and MBPP keep their problems in: test
    assert task.task_id == "MBPP/2" and "def add(a, b):" in task.prompt
    with pytest.raises(ConfigError, match="cannot load data set 'openai/openai_humaneval'"):
        load_humaneval("openai/openai_humaneval")  # the Hub id users with network pass


def test_the_pipeline_reads_sft_data_from_a_data_set(tmp_path):
    from agentrl.pipeline.config import build_run_config, resolve

    datasets.Dataset.from_list([{"conversation": m} for m in CONVERSATIONS]).to_parquet(str(tmp_path / "s.parquet"))
    run = build_run_config("toy-echo", overrides=[f"sft.data={tmp_path / 's.parquet'}",
                                                  "sft.columns={messages: conversation}"])  # fmt: skip
    assert run.sft.data and run.sft.columns == {"messages": "conversation"}
    assert resolve(run, tmp_path / "run").sft is not None  # the SFT phase is on without env demonstrations


@pytest.mark.slow
def test_sft_command_trains_on_a_parquet_data_set(tmp_path, one_thread):
    from agentrl.cli import main

    datasets.Dataset.from_list([{"conversation": m} for m in CONVERSATIONS]).to_parquet(str(tmp_path / "s.parquet"))
    out = tmp_path / "out"
    code = main(["sft", "--data", str(tmp_path / "s.parquet"), "--columns", "messages=conversation",
                 "--output-dir", str(out), "--set", "max_steps=2", "--set", "warmup_steps=0", "--set", "batch_size=2",
                 "--report-to", "none"])  # fmt: skip
    assert code == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert (out / "checkpoints" / "sft" / "step-000002" / "config.json").is_file()
    assert not (out / "tensorboard").exists()
