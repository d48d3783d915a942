"""`metaham cache`: lists the pools a real TaskDistribution wrote, clears them by system, touches nothing else."""
import json

from metaham.cli import main
from tasks import TaskConfig, TaskDistribution


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cache_lists_and_clears_real_pools(tmp_path, capsys):
    config = TaskConfig(k_support=5, k_query=5, points_per_trajectory=20, tasks_per_system=3, rollouts_per_task=1, rollout_steps=10)
    for name in ("mass_spring", "pendulum"):
        TaskDistribution([name], config, seed=0, cache_dir=tmp_path).sample(1, seed=0)
    (tmp_path / "notes.txt").write_text("not a pool")

    assert main(["cache", "--dir", str(tmp_path), "--json"]) == 0
    listed = _json(capsys)
    assert listed["files"] == 2 and set(listed["systems"]) == {"mass_spring", "pendulum"}
    assert listed["bytes"] > 0 and not listed["cleared"]

    assert main(["cache", "--dir", str(tmp_path), "--clear", "--system", "pendulum", "--json"]) == 0
    assert _json(capsys)["systems"].keys() == {"pendulum"}
    assert main(["cache", "--dir", str(tmp_path), "--json"]) == 0
    assert set(_json(capsys)["systems"]) == {"mass_spring"}

    assert main(["cache", "--dir", str(tmp_path), "--clear"]) == 0
    assert "deleted 1 pool file" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
