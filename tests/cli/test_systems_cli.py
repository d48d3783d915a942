"""`metaham systems`: the table, one system in detail, JSON, plugins, unknown names."""
import json
from pathlib import Path

from metaham.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_systems_lists_every_system_with_particles_and_ranges(capsys):
    assert main(["systems", "--json"]) == 0
    infos = {s["name"]: s for s in _json(capsys)["systems"]}
    builtin = {"mass_spring", "pendulum", "henon_heiles", "magnetic_mirror", "two_body", "three_body", "spring_chain"}
    assert builtin <= set(infos)
    assert infos["three_body"]["particles"] == 3 and infos["three_body"]["dim"] == 2
    assert infos["pendulum"]["dof"] == 1  # one degree of freedom: y is the surplus coordinate
    g = next(p for p in infos["pendulum"]["params"] if p["name"] == "g")
    assert (g["default"], g["low"], g["high"]) == (3.0, 1.0, 10.0)
    assert infos["spring_chain"]["edges"] == [[0, 1], [1, 2]]
    assert not infos["two_body"]["external_field"] and infos["henon_heiles"]["external_field"]


def test_systems_table_and_detail(capsys):
    assert main(["systems"]) == 0
    table = capsys.readouterr().out
    assert "magnetic_mirror" in table and "p_theta=-1[-2,-0.5]" in table
    assert main(["systems", "henon_heiles"]) == 0
    detail = capsys.readouterr().out
    assert "1 / (6 lam^2)" in detail and "Henon and Heiles 1964" in detail


def test_unknown_system_exits_2_naming_the_known_ones(capsys):
    assert main(["systems", "pendulumm"]) == 2
    err = capsys.readouterr().err
    assert "unknown system 'pendulumm'" in err and "pendulum" in err and "two_body" in err


def test_plugin_adds_a_system(capsys):
    assert main(["systems", "--plugin", str(EXAMPLES / "duffing.py"), "--json"]) == 0
    names = [s["name"] for s in _json(capsys)["systems"]]
    assert "duffing" in names
    assert main(["systems", "--plugin", "no/such/file.py"]) == 2
    assert "plugin no/such/file.py: no such file" in capsys.readouterr().err
