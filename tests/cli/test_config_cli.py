"""`metaham config` and how a --config value is found: a file first, else a shipped config of that name."""
import json

import pytest
import yaml

from metaham.cli import main
from metaham.meta.config import load_meta_config
from metaham.qh9.train import DEFAULT_CONFIG, SCHEMA, load_train_config
from metaham.train.config import ConfigError, load_config, resolve_config_path, shipped_config, shipped_configs_dir


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_list_names_every_run_config_and_split(capsys):
    assert main(["config", "list", "--json"]) == 0
    names = _json(capsys)["configs"]
    assert {"qh9", "meta_train", "meta_train_leave_pendulum", "splits/leave_pendulum"} <= set(names)


def test_show_prints_the_file_verbatim_and_the_copy_loads_as_the_same_config(tmp_path, capsys):
    assert main(["config", "show", "qh9"]) == 0
    text = capsys.readouterr().out
    assert text.rstrip("\n") == shipped_config("qh9").read_text().rstrip("\n")
    copy = tmp_path / "my.yaml"
    copy.write_text(text)
    assert load_train_config(copy) == load_train_config("qh9")


def test_the_schema_defaults_are_the_shipped_qh9_yaml():
    # `qh9 train` without --config reads configs/qh9.yaml; the Python API's defaults must say the same.
    assert load_train_config(None) == load_train_config(DEFAULT_CONFIG)


@pytest.mark.parametrize("argv, culprit", [
    (["config", "show", "nosuch"], "nosuch"),
    (["config", "show"], "needs a NAME"),
    (["config", "list", "qh9"], "qh9"),
])
def test_bad_names_are_usage_errors(argv, culprit, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and "Traceback" not in err


def test_a_file_on_disk_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qh9.yaml").write_text("train: {epochs: 3}\n")
    assert load_train_config("qh9.yaml")["train"]["epochs"] == 3
    assert load_train_config("qh9")["train"]["epochs"] == SCHEMA["train"]["epochs"]  # bare name: the shipped one


def test_repository_relative_paths_find_the_shipped_copy_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/meta_train_leave_pendulum.yaml") == shipped_config("meta_train_leave_pendulum")
    assert load_meta_config("meta_train_leave_pendulum")["split"] == "leave_pendulum"
    assert resolve_config_path("configs/splits/leave_pendulum.yaml") == shipped_configs_dir() / "splits" / "leave_pendulum.yaml"


def test_a_missing_file_elsewhere_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "qh9.yaml"  # a shipped name, but in a folder of the user's: never silently replaced
    with pytest.raises(ConfigError, match=str(missing)):
        load_config({"a": 1}, missing)


def test_every_shipped_yaml_parses():
    for path in shipped_configs_dir().rglob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
