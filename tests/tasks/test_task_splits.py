"""Named splits: they load, leave the held-out system out, and bad files fail naming the key."""
import pytest
import torch

import systems
from metaham.train.config import ConfigError
from tasks import Split, load_split, split_names

SINGLE = {"mass_spring", "pendulum", "henon_heiles", "magnetic_mirror"}


def test_shipped_splits_load():
    names = set(split_names())
    assert {f"leave_{s}" for s in SINGLE} | {"leave_three_body", "parametric_mass_spring"} <= names
    known = set(systems.names())
    for name in names:
        split = load_split(name)
        assert split.name == name and split.description
        assert set(split.train_systems) | set(split.test_systems) <= known


@pytest.mark.parametrize("held_out", sorted(SINGLE))
def test_leave_one_out_excludes_the_held_out_system(held_out):
    split = load_split(f"leave_{held_out}")
    assert split.kind == "leave_one_out"
    assert split.test_systems == (held_out,)
    assert set(split.train_systems) == SINGLE - {held_out}


def test_multi_particle_split():
    split = load_split("leave_three_body")
    assert split.test_systems == ("three_body",)
    assert set(split.train_systems) == {"two_body", "spring_chain"}
    assert all(systems.get(s).n_particles > 1 for s in split.train_systems + split.test_systems)


def test_parametric_split_samples_its_ranges(small_config, tmp_path):
    split = load_split("parametric_mass_spring")
    assert split.train_systems == split.test_systems == ("mass_spring",)
    train = split.train_distribution(small_config, seed=0, cache_dir=tmp_path)
    test = split.test_distribution(small_config, seed=0, cache_dir=tmp_path)
    train_m = torch.stack([t.params["m"] for t in train.sample(6, seed=0)])
    test_m = torch.stack([t.params["m"] for t in test.sample(6, seed=0)])
    assert bool(((train_m >= 0.5) & (train_m <= 1.0)).all()) and bool(((test_m >= 1.0) & (test_m <= 2.0)).all())
    assert split.to_dict()["test_ranges"] == {"mass_spring": {"m": [1.0, 2.0]}}


def test_a_system_on_both_sides_gets_fresh_draws_for_testing(small_config):
    both = {"name": "x", "kind": "explicit", "train_systems": ["pendulum"], "test_systems": ["pendulum"]}
    split = Split.from_dict(both)
    train = split.train_distribution(small_config, seed=0, cache=False).sample(3, seed=0)
    test = split.test_distribution(small_config, seed=0, cache=False).sample(3, seed=0)
    assert not any(torch.equal(a.params["l"], b.params["l"]) for a in train for b in test)


def _write(tmp_path, text):
    path = tmp_path / "split.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("kind: leave_one_out\nsystems: [mass_spring, pendulum]\nheld_out: pendulum\nheldout: x\n",
         "unknown key 'heldout' for a leave_one_out split"),
        ("kind: leave_one_out\nsystems: [mass_spring, pendulm]\nheld_out: mass_spring\n",
         "key 'systems': unknown system 'pendulm'; known systems: .*mass_spring"),
        ("kind: leave_one_out\nsystems: [mass_spring, pendulum]\nheld_out: two_body\n",
         "key 'held_out': 'two_body' is not in 'systems'"),
        ("kind: leave_one_out\nsystems: [mass_spring]\n", "needs the key 'held_out'"),
        ("kind: leave_two_out\n", "key 'kind' must be one of leave_one_out, explicit, parametric"),
        ("kind: explicit\ntrain_systems: mass_spring\ntest_systems: [pendulum]\n",
         "key 'train_systems' must be a non-empty list"),
        ("kind: parametric\nsystem: mass_spring\ntrain_ranges: {m: [1.0, 0.5]}\ntest_ranges: {m: [1, 2]}\n",
         "key 'train_ranges.m': .*low 1.0 > high 0.5"),
        ("kind: parametric\nsystem: mass_spring\ntrain_ranges: {mass: [0.5, 1]}\ntest_ranges: {m: [1, 2]}\n",
         "key 'train_ranges.mass': .*no parameter 'mass'"),
        ("kind: parametric\nsystem: mass_spring\ntrain_ranges: {m: [0.5, 1]}\ntest_ranges: {m: [-1, 2]}\n",
         "key 'test_ranges.m': .*must be > 0"),
        ("[1, 2]\n", "expected a mapping"),
        ("kind: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_split_files_name_the_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_split(path)
    assert path in str(info.value)


def test_unknown_split_name_lists_the_named_ones():
    with pytest.raises(ConfigError, match="unknown split 'leave_everything'; named splits: .*leave_pendulum"):
        load_split("leave_everything")
    with pytest.raises(ConfigError, match="split file not found"):
        load_split("missing/split.yaml")
