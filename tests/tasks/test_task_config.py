"""TaskConfig: the paper's defaults, and errors that name the field at fault."""
import dataclasses

import pytest
import yaml

from metaham.train.config import ConfigError, load_config
from tasks import TaskConfig


def test_defaults_follow_the_paper():
    config = TaskConfig()
    assert (config.k_support, config.k_query, config.points_per_trajectory, config.t_end) == (50, 50, 200, 10.0)
    assert config.tasks_per_system * config.trajectories_per_task == 10_000  # trajectories per system
    assert config.rollout_steps >= 200 and config.noise_std == 0.0
    assert TaskConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("k_support", 0, "'k_support' must be >= 1"),
        ("k_query", 2.5, "'k_query' must be int"),
        ("t_end", -1.0, "'t_end' must be a finite number > 0"),
        ("tolerance", float("nan"), "'tolerance' must be a finite number > 0"),
        ("noise_std", -0.1, "'noise_std' must be >= 0"),
        ("points_per_trajectory", 1, "'points_per_trajectory' must be >= 2"),
        ("integrator", "euler", "'integrator' must be one of"),
        ("dtype", "float16", "'dtype' must be one of"),
        ("k_support", 1000, "'k_support' \\+ 'k_query' = 1050 exceeds the 1000 points"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TaskConfig(), **{field: value})


def test_from_dict_names_unknown_keys_and_the_source():
    with pytest.raises(ConfigError, match="my.yaml: unknown key 'k_shot' .*known keys: k_support"):
        TaskConfig.from_dict({"k_shot": 5}, source="my.yaml")
    with pytest.raises(ConfigError, match="my.yaml: 'noise_std' must be >= 0"):
        TaskConfig.from_dict({"noise_std": -1}, source="my.yaml")
    assert TaskConfig.from_dict({"t_end": 5}).t_end == 5.0  # ints are fine where floats are expected


def test_embeds_in_a_yaml_config(tmp_path):
    schema = {"tasks": TaskConfig.schema(), "lr": 1e-3}
    good = tmp_path / "run.yaml"
    good.write_text(yaml.safe_dump({"tasks": {"k_support": 5, "noise_std": 0.01}}))
    config = TaskConfig.from_dict(load_config(schema, good, ["tasks.tasks_per_system=100"])["tasks"])
    assert (config.k_support, config.noise_std, config.tasks_per_system) == (5, 0.01, 100)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": {"k_suport": 5}}))
    with pytest.raises(ConfigError, match="unknown key 'tasks.k_suport'"):
        load_config(schema, bad)
