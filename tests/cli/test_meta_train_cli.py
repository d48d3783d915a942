"""`metaham meta-train` as a user runs it: JSON output, run directory, --resume, config errors (exit 2)."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from metaham.cli import main

TINY = str(Path(__file__).parents[1] / "meta" / "tiny_meta_train.yaml")


@pytest.fixture(autouse=True)
def _task_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METAHAM_CACHE", str(tmp_path_factory.getbasetemp() / "metaham_cache"))


def _train(capsys, out, *extra):
    code = main(["meta-train", "--config", TINY, "--out", str(out), "--json", "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured


def test_meta_train_end_to_end_and_resume(tmp_path, capsys):
    code, captured = _train(capsys, tmp_path / "run", "--set", "train.outer_steps=2")
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["split"] == "leave_pendulum" and result["test_systems"] == ["pendulum"]
    assert {k: v["steps"] for k, v in result["learners"].items()} == {"meta": 2, "pretrained": 2}
    assert "meta" in captured.out and "next: metaham adapt" in captured.out
    run = tmp_path / "run"
    assert {"config.yaml", "meta.pt", "pretrained.pt", "meta.csv", "pretrained.csv"} <= {p.name for p in run.iterdir()}
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["outer_steps"] == 2

    # Continue to 4 steps; the result equals an uninterrupted 4-step run.
    code, captured = _train(capsys, run, "--resume", "--set", "train.outer_steps=4")
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["learners"]["meta"]["resumed_from"] == 2 and result["learners"]["meta"]["steps"] == 4
    code, _ = _train(capsys, tmp_path / "straight", "--set", "train.outer_steps=4")
    assert code == 0
    for kind in ("meta", "pretrained"):
        resumed = torch.load(run / f"{kind}.pt", weights_only=True)
        straight = torch.load(tmp_path / "straight" / f"{kind}.pt", weights_only=True)
        assert resumed["step"] == straight["step"] == 4
        for name, value in straight["model"].items():
            assert torch.equal(resumed["model"][name], value), (kind, name)

    # --resume without --config reads the saved config; a finished run trains nothing more.
    code = main(["meta-train", "--out", str(run), "--resume", "--json", "--no-progress"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["learners"]["meta"]["resumed_from"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "train.bogus=1"], "train.bogus"),
        (["--set", "model.hidden=wide"], "model.hidden"),
        (["--set", "maml.first_order=maybe"], "maml.first_order"),
        (["--set", "split=leave_nowhere"], "leave_nowhere"),
        (["--set", "novalue"], "novalue"),
    ],
)
def test_config_errors_exit_2_naming_the_key(tmp_path, capsys, extra, message):
    code, captured = _train(capsys, tmp_path / "run", *extra)
    assert code == 2
    assert message in captured.err
    assert not (tmp_path / "run" / "meta.pt").exists()


def test_bad_config_file_and_run_directory_rules(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: leave_pendulum\nmodle: {hidden: 8}\n")
    assert main(["meta-train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "modle" in capsys.readouterr().err
    assert main(["meta-train", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.yaml" in capsys.readouterr().err

    code, _ = _train(capsys, tmp_path / "run", "--set", "train.outer_steps=1", "--set", "train.pretrain=false")
    assert code == 0
    code, captured = _train(capsys, tmp_path / "run", "--set", "train.outer_steps=1")
    assert code == 2 and "--resume" in captured.err
    code, captured = _train(capsys, tmp_path / "run", "--resume", "--set", "model.layers=2")
    assert code == 2 and "model.layers" in captured.err


def test_a_rank_failure_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """Not the user's error (exit 2) nor a bug (a traceback): a peer rank died; the survivor says so in one line."""
    from metaham.cli import meta_train
    from metaham.train.distributed import RankFailure

    def failing(args):
        raise RankFailure("rank 0 of 2: all_reduce failed: a peer rank exited\n(RuntimeError: Connection reset)")

    monkeypatch.setattr(meta_train, "run", failing)
    assert main(["meta-train", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err == ("metaham meta-train: error: rank failure: rank 0 of 2: all_reduce failed: a peer rank exited "
                   "(RuntimeError: Connection reset)\n")
