"""Registry: ids and versions, did-you-mean, entry points read lazily, broken plug-ins isolated, Gymnasium ids."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import gymnasium
import pytest

import agentrl
from agentrl.errors import EnvNotFoundError, PluginError, RegistryError
from agentrl.testing import EchoEnv


@pytest.fixture
def registered():
    from agentrl import registry

    ids = []

    def _register(env_id, *args, **kwargs):
        ids.append(env_id)
        return agentrl.register(env_id, *args, **kwargs)

    yield _register
    for env_id in ids:
        registry._REGISTRY.pop(env_id, None)
        gymnasium.registry.pop(f"agentrl/{env_id}", None)


def test_bare_name_means_latest_version(registered):
    registered("echo-test-v0", EchoEnv, kwargs={"rounds": 1})
    registered("echo-test-v2", "agentrl.testing:EchoEnv", kwargs={"rounds": 2}, description="two rounds")
    registered("echo-test-v1", EchoEnv)
    assert agentrl.spec("echo-test").id == "echo-test-v2"
    env = agentrl.make("echo-test", rounds=4)
    assert env.rounds == 4 and env.spec.id == "agentrl/echo-test-v2" and env.spec.kwargs["rounds"] == 4
    assert agentrl.make("echo-test-v0").rounds == 1


def test_gymnasium_make_builds_registered_envs(registered):
    registered("echo-gym-v0", EchoEnv, kwargs={"rounds": 2}, max_turns=2)
    env = gymnasium.make("agentrl/echo-gym-v0")
    assert isinstance(env.unwrapped, EchoEnv) and env.unwrapped.rounds == 2
    obs, _ = env.reset(seed=0)
    assert obs[-1]["role"] == "user"
    env.close()


def test_registration_errors_name_the_fix(registered):
    registered("dup-test-v0", EchoEnv)
    with pytest.raises(RegistryError, match="override=True"):
        agentrl.register("dup-test-v0", EchoEnv)
    with pytest.raises(RegistryError, match="module:ClassName"):
        agentrl.register("bad-ep-v0", "agentrl.testing.EchoEnv")
    with pytest.raises(RegistryError, match="invalid env id"):
        agentrl.register("has space", EchoEnv)


def test_unknown_id_suggests_close_ids_and_how_to_install():
    with pytest.raises(EnvNotFoundError) as info:
        agentrl.make("toy-gess-v0")
    message = str(info.value)
    assert "toy-guess-v0" in message and "pip install" in message and "agentrl envs" in message


def test_bundled_toy_envs_come_from_entry_points():
    specs = {s.id: s for s in agentrl.list_envs()}
    assert {"toy-echo-v0", "toy-guess-v0"} <= specs.keys()
    assert specs["toy-guess-v0"].source.startswith("entry point of agentrl")
    assert "secret number" in specs["toy-guess-v0"].summary()


def test_a_plug_in_returning_a_non_env_is_reported(registered):
    registered("not-env-v0", dict)
    with pytest.raises(PluginError, match=r"not an agentrl\.Env"):
        agentrl.make("not-env-v0")


PLUGIN_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    t = time.perf_counter()
    import agentrl, gymnasium
    from agentrl import registry
    read_at_import = registry._plugins_read
    out = {"read_at_import": read_at_import}
    try:
        agentrl.make("broken-plugin-v0")
    except agentrl.PluginError as exc:
        out["broken"] = str(exc)
    env = agentrl.make("good-plugin-v0")
    out["good"] = type(env).__name__
    out["gym"] = type(gymnasium.make("agentrl/good-plugin-v0").unwrapped).__name__
    out["listed"] = sorted(s.id for s in agentrl.list_envs() if "plugin" in s.id)
    out["bad_names"] = registry.broken_plugins()
    print(json.dumps(out))
    """
)


def test_one_broken_plug_in_breaks_nothing_else(tmp_path):
    """A real distribution on sys.path declares three entry points: good, broken import, bad id."""
    dist = tmp_path / "demo_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[agentrl.envs]\n"
        "good-plugin-v0 = demo_good:Good\n"
        "broken-plugin-v0 = demo_broken:Broken\n"
        "Bad Name = demo_good:Good\n"
    )
    (tmp_path / "demo_good.py").write_text(
        "from agentrl.testing import EchoEnv\nclass Good(EchoEnv):\n    'A good plug-in.'\n"
    )
    (tmp_path / "demo_broken.py").write_text("raise RuntimeError('this plug-in is broken')\n")
    proc = subprocess.run(
        [sys.executable, "-c", PLUGIN_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["read_at_import"] is False
    assert "broken-plugin-v0" in out["broken"] and "this plug-in is broken" in out["broken"]
    assert "demo-plugins" in out["broken"]
    assert out["good"] == "Good" and out["gym"] == "Good"
    assert out["listed"] == ["broken-plugin-v0", "good-plugin-v0"]
    assert "Bad Name" in out["bad_names"]


def test_agentrl_envs_lists_envs_and_reports_broken_plug_ins(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "agentrl.cli", "envs"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "toy-guess-v0" in proc.stdout and "secret number" in proc.stdout


def test_entry_point_metadata_is_not_read_at_import():
    code = "import agentrl, agentrl.registry as r, json; print(json.dumps(r._plugins_read))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout) is False


def test_a_loader_scheme_builds_envs_by_target_and_unknown_schemes_name_the_known_ones():
    from agentrl.registry import _LOADERS, list_loaders, register_loader
    from agentrl.testing import GuessEnv

    seen = []

    def load(target, **kwargs):
        seen.append((target, kwargs))
        return GuessEnv()

    register_loader("toyloader", load, description="guess envs by target")
    try:
        env = agentrl.make("toyloader:some/where:7", max_turns=3)
        assert isinstance(env, GuessEnv) and seen == [("some/where:7", {"max_turns": 3})]
        assert agentrl.spec("toyloader:x").source == "loader toyloader"
        assert list_loaders()["toyloader"] == "guess envs by target"
        with pytest.raises(EnvNotFoundError, match="toyloader:"):
            agentrl.make("toyloadr:x")
    finally:
        _LOADERS.pop("toyloader", None)
