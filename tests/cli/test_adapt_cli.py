"""`metaham adapt` as a user runs it: the issue's JSON shape, a plugin system, input errors (exit 2)."""
import json
from pathlib import Path

import pytest

import systems
from metaham.cli import main

TINY = str(Path(__file__).parents[1] / "meta" / "tiny_meta_train.yaml")

PLUGIN = '''
import torch
import systems
from systems.base import Param, System, random_direction, sampling_frame, uniform


@systems.register
class AnisotropicOscillator(System):
    """H = |p|^2 / 2 + (q_x^2 + w^2 q_y^2) / 2: a user's new physics."""

    name = "test_anisotropic_oscillator"
    params = (Param("w", 1.5, 1.0, 2.0, "frequency of the y axis"),)

    def hamiltonian(self, q, p, params):
        w = params["w"]
        return (p[..., 0, :] ** 2).sum(-1) / 2 + (q[..., 0, 0] ** 2 + (w * q[..., 0, 1]) ** 2) / 2

    def vector_field(self, q, p, params):
        w = params["w"][..., None]
        scale = torch.stack([torch.ones_like(w), w * w], dim=-1)
        return p, -q * scale

    def sample_initial_state(self, params, generator):
        params, like = sampling_frame(params)
        n = params["w"].shape[0]
        q = (uniform(generator, (n,), 0.2, 1.0, torch.float64)[:, None] * random_direction(generator, n))[:, None]
        p = (uniform(generator, (n,), 0.2, 1.0, torch.float64)[:, None] * random_direction(generator, n))[:, None]
        return q.to(like), p.to(like)
'''


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "metaham_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAHAM_CACHE", str(cache))
        out = tmp_path_factory.mktemp("adapt") / "run"
        assert main(["meta-train", "--config", TINY, "--out", str(out), "--no-progress",
                     "--set", "train.outer_steps=2", "--set", "train.validate_every=0"]) == 0
    return out


@pytest.fixture(autouse=True)
def _task_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METAHAM_CACHE", str(tmp_path_factory.getbasetemp() / "metaham_cache"))


def _adapt(capsys, *args):
    """Exit code and output of `metaham adapt ARGS` (argparse's own rejections exit through SystemExit)."""
    try:
        code = main(["adapt", *args, "--no-progress"])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


def test_adapt_reports_the_issue_json_shape_and_a_plot(run_dir, tmp_path, capsys):
    plot = tmp_path / "adapt.png"
    code, captured = _adapt(capsys, "--checkpoint", str(run_dir), "--system", "pendulum", "--shots", "6",
                            "--steps", "12", "--tasks", "2", "--plot", str(plot), "--json")
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert (result["system"], result["shots"], result["steps"]) == ("pendulum", 6, 12)
    assert list(result["models"]) == ["meta", "pretrained", "random"]
    for metrics in result["models"].values():
        assert list(metrics["vf_mse"]) == ["0", "1", "5", "10", "12"] == list(metrics["vf_nmse"])
        # Each task's MSE over the mean square of its query targets: the ratio of means is not the mean of
        # ratios, but both are positive and finite, and a zero-field prediction would give exactly 1 per task.
        assert all(0 < v < float("inf") for v in metrics["vf_nmse"].values())
        assert all(isinstance(v, float) and v >= 0 for v in metrics["vf_mse"].values())
        assert 0 <= metrics["rollout_rel_err"] <= 1 and 0 <= metrics["energy_rel_err"] <= 1
    assert "full-batch SGD at lr 0.3, a step that does not lower the support loss halved up to 10" in result["protocol"]
    assert result["adapt_backtrack"] == 10
    assert result["held_out"] is True and result["split_role"] == "test"
    assert plot.is_file() and plot.stat().st_size > 0
    assert "mse@10" in captured.out and "protocol:" in captured.out


def test_adapt_to_a_plugin_system(run_dir, tmp_path, capsys, monkeypatch):
    # The plugin registers into a copy of the registry, so later tests see only the built-in systems.
    monkeypatch.setattr(systems, "_REGISTRY", dict(systems._REGISTRY))
    plugin = tmp_path / "oscillator.py"
    plugin.write_text(PLUGIN)
    code, captured = _adapt(capsys, "--checkpoint", str(run_dir), "--plugin", str(plugin),
                            "--system", "test_anisotropic_oscillator", "--shots", "5", "--steps", "2", "--tasks", "2",
                            "--backtrack", "0", "--json")
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    # Never trained on, so held out, though the split does not name it as a test system.
    assert result["system"] == "test_anisotropic_oscillator" and result["held_out"] is True
    assert result["split_role"] == "unseen"
    assert list(result["models"]["meta"]["vf_mse"]) == ["0", "1", "2"]
    assert "held out from training: not in split" in captured.out and "NOT held out" not in captured.out
    assert "plain full-batch SGD" in result["protocol"] and result["adapt_backtrack"] == 0


def test_adapt_to_a_training_system_says_it_is_not_held_out(run_dir, capsys):
    code, captured = _adapt(capsys, "--checkpoint", str(run_dir), "--system", "mass_spring", "--shots", "5",
                            "--steps", "1", "--tasks", "2", "--json")
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert "mass_spring" in result["train_systems"]
    assert result["held_out"] is False and result["split_role"] == "train"
    assert "NOT held out: trained on" in captured.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--system", "warp_drive", "--shots", "5", "--steps", "2"], "known systems"),
        (["--system", "pendulum", "--shots", "0", "--steps", "2"], "--shots"),
        (["--system", "pendulum", "--shots", "5", "--steps", "-1"], "--steps"),
        (["--system", "pendulum", "--shots", "5", "--steps", "2", "--tasks", "2.5"], "--tasks"),
        (["--system", "pendulum", "--shots", "500", "--steps", "2"], "k_support"),
        (["--system", "pendulum", "--shots", "5", "--steps", "2", "--plot", "curves.txt"], "--plot"),
        (["--system", "pendulum", "--shots", "5", "--steps", "2", "--backtrack", "-1"], "--backtrack"),
    ],
)
def test_bad_input_exits_2_naming_it(run_dir, capsys, args, message):
    code, captured = _adapt(capsys, "--checkpoint", str(run_dir), *args)
    assert code == 2
    assert message in captured.err


def test_missing_run_directory_exits_2_naming_it(tmp_path, capsys):
    code, captured = _adapt(capsys, "--checkpoint", str(tmp_path / "nowhere"), "--system", "pendulum",
                            "--shots", "5", "--steps", "2")
    assert code == 2 and "nowhere" in captured.err
    (tmp_path / "empty").mkdir()
    code, captured = _adapt(capsys, "--checkpoint", str(tmp_path / "empty"), "--system", "pendulum",
                            "--shots", "5", "--steps", "2")
    assert code == 2 and "empty/meta.pt not found; has `metaham meta-train" in captured.err
