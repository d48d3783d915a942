"""`metaham qh9 train` / `eval` and the training loop: it learns, resumes exactly, checkpoints load safely."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from metaham.cli import main
from metaham.qh9 import generate as gen
from metaham.qh9.train import load_train_config, read_log, train
from metaham.train import ConfigError

# A small model: the same code paths as the default one (both gates, all three phases), a fraction of the cost.
TINY = dict(
    node_irreps="8x0e+4x1o+4x2e+2x3o+2x4e", layers=2, lmax_sh=2, radial_hidden=16, pair_channels=4, head_mul=4,
    head_hidden=16, random_steps=5, adaptive_steps=5,
)
QUICK = {"train.batch_size": 8, "train.warmup_steps": 5, "train.lr": 0.01, "train.decay": "none",
         "data.split_by": "stable-id", "threads": 1, "device": "cpu"}


def _sets(extra=None, **model):
    values = {**{f"model.{k}": v for k, v in {**TINY, **model}.items()}, **QUICK, **(extra or {})}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def water(tmp_path_factory):
    """Ten displaced water geometries with QH9's pyscf settings (stable-id split: 8 train, 1 val, 1 test)."""
    path = tmp_path_factory.mktemp("water") / "water.db"
    stats = gen.generate(path, gen.g2_molecules(["H2O"]), conformers=10, displacement=0.1, progress=False)
    assert stats["computed"] == 10
    return path


def test_short_training_run_lowers_validation_h_mae_tenfold(water, tmp_path):
    """Learning H itself (the residual set-up starts at the MINAO guess, whose error is already small):
    from the per-element references alone to a trained model on a held-out geometry."""
    config = load_train_config(None, _sets({"train.epochs": 100, "data.file": water}, residual=False))
    result = train(config, tmp_path / "run", progress=False)
    log = read_log(tmp_path / "run")
    assert log[0]["step"] == 0 and log[0]["val_h_mae_ueh"] == pytest.approx(result["initial_val_h_mae_ueh"])
    assert result["phase"] == "fixed" and result["steps"] == 100
    assert result["best_val_h_mae_ueh"] <= result["initial_val_h_mae_ueh"] / 10, result


def test_resume_reproduces_an_uninterrupted_run(water, tmp_path):
    """Stopped by the clock after one step (random phase, mid-epoch), again after the next (end of an epoch),
    then resumed to the end through the adaptive and fixed phases: the same weights, kept paths and optimizer
    state as a run that went straight through."""
    extra = {"train.batch_size": 4, "train.epochs": 3, "data.file": water}  # 2 steps per epoch, 6 in all
    phases = dict(random_steps=3, adaptive_steps=2)
    train(load_train_config(None, _sets(extra, **phases)), tmp_path / "straight", progress=False)

    clock = load_train_config(None, _sets({**extra, "train.max_minutes": "1.0e-9"}, **phases))
    first = train(clock, tmp_path / "pieces", progress=False)
    assert first["stopped"] == "max_minutes" and first["steps"] == 1 and first["phase"] == "random"
    second = train(clock, tmp_path / "pieces", resume=True, progress=False)
    assert second["steps"] == 2 and second["epochs"] == 1
    resumed = train(load_train_config(None, _sets(extra, **phases)), tmp_path / "pieces", resume=True, progress=False)
    assert resumed["steps"] == 6 and resumed["phase"] == "fixed" and resumed["stopped"] == "epochs"

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "pieces" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    # The log holds each epoch once, and the epoch cut by the clock averages all its batches: it reads as the
    # uninterrupted run's (but for the seconds).
    same = lambda log: [{k: v for k, v in row.items() if k != "seconds"} for row in log]  # noqa: E731
    pieces_log = read_log(tmp_path / "pieces")
    assert [r["epoch"] for r in pieces_log] == [0, 1, 2, 3] and pieces_log[-1]["step"] == 6
    assert same(pieces_log) == same(read_log(tmp_path / "straight"))


def test_cli_train_then_eval_with_saved_predictions(water, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [x for s in _sets({"train.epochs": 2}) for x in ("--set", s)]
    assert main(["qh9", "train", "--data", str(water), "--out", str(run), *sets, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["epochs"] == 2 and (run / "best.pt").is_file() and (run / "last.pt").is_file()
    assert "validation H MAE" in "\n".join(out[:-1])

    npz = tmp_path / "pred.npz"
    assert main(["qh9", "eval", "--checkpoint", str(run), "--split", "all", "--save-predictions", str(npz),
                 "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    scores = json.loads(out[-1])
    for key in ("n", "h_mae_ueh", "h_diag_mae_ueh", "h_offdiag_mae_ueh", "eps_mae_ueh", "psi_cos_pct"):
        assert scores[key] is not None and scores[key] > 0, key
    assert scores["n"] == 10 and scores["residual"] is True and 0 < scores["psi_cos_pct"] <= 100
    saved = np.load(npz)
    assert sorted(saved["ids"].tolist()) == list(range(1, 11))
    assert saved["H_1"].shape == (24, 24) and np.allclose(saved["H_1"], saved["H_1"].T)
    assert "H uEh" in "\n".join(out[:-1])

    # The cuequivariance backend runs fixed kept paths only: this model is still in its random phase.
    assert main(["qh9", "eval", "--checkpoint", str(run), "--tp-backend", "cuequivariance", "--device", "cpu"]) == 2
    assert "in the 'random' phase" in capsys.readouterr().err

    # A model whose weights went NaN (by hand here) predicts NaN: one line naming the rows, exit 2.
    for name in ("best.pt", "last.pt"):
        state = torch.load(run / name, weights_only=False)
        state["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()}
        torch.save(state, run / name)
    assert main(["qh9", "eval", "--checkpoint", str(run), "--split", "all", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "predicted matrix holds a non-finite value (NaN or inf)" in err


def test_eval_with_the_cuequivariance_backend_scores_the_same(water, tmp_path, capsys):
    pytest.importorskip("cuequivariance_torch")
    run = tmp_path / "run"
    sets = [x for s in _sets({"train.epochs": 2}, random_steps=1, adaptive_steps=1) for x in ("--set", s)]
    assert main(["qh9", "train", "--data", str(water), "--out", str(run), *sets]) == 0
    scores = {}
    for backend in ("torch", "cuequivariance"):
        capsys.readouterr()
        assert main(["qh9", "eval", "--checkpoint", str(run), "--split", "all", "--device", "cpu",
                     "--tp-backend", backend, "--json"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        scores[backend] = json.loads(out[-1])
    assert scores["cuequivariance"]["phase"] == "fixed" and scores["cuequivariance"]["tp_backend"] == "cuequivariance"
    assert scores["cuequivariance"]["tp_method"] == "naive" and scores["torch"]["tp_method"] is None
    assert "tensor products run by cuequivariance (naive)" in "\n".join(out[:-1])
    for key in ("h_mae_ueh", "eps_mae_ueh", "psi_cos_pct", "homo_mae_ueh"):
        assert scores["cuequivariance"][key] == pytest.approx(scores["torch"][key], rel=1e-4), key


def test_bad_config_and_reused_run_directory_exit_2(water, tmp_path, capsys):
    args = ["qh9", "train", "--data", str(water), "--out", str(tmp_path / "r")]
    assert main([*args, "--set", "model.widht=3"]) == 2
    assert "unknown key 'model.widht'" in capsys.readouterr().err
    assert main([*args, "--set", "model.tp_sparsity=1.5"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main(["qh9", "train", "--out", str(tmp_path / "r")]) == 2
    assert "--data FILE is required" in capsys.readouterr().err
    assert main(["qh9", "eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_bench_train_speedup_runs(capsys):
    assert main(["bench", "qh9", "--part", "train", "--train-molecules", "1", "--train-repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["train_speedup"] > 0 and result["train_dense_s"] > 0 and result["train_sparse_s"] > 0
    assert 0 < result["kept_paths"] < result["total_paths"] and 0 < result["kept_pair_fraction"] <= 1
    # The command set malloc up for tensors (metaham.allocator) and says so beside its timings.
    assert result["cpu_allocator"].startswith("glibc: mmap threshold") or not sys.platform.startswith("linux")
    # The hooks see the products, forward and backward. Their time comes from other steps than the step time
    # (hooks cost time of their own), one repeat each here: on a shared 2-core machine two single timings of
    # the same work differ by up to ~2x, so "a part of the step" is only checked to within that noise (a
    # hook timing in wrong units or counting every product many times would still be far off).
    for model in ("dense", "sparse"):
        assert 0 < result[f"train_{model}_tp_s"] < 3 * result[f"train_{model}_s"]


def test_bench_train_times_the_model_the_overrides_describe(capsys):
    argv = ["bench", "qh9", "--part", "train", "--train-molecules", "1", "--train-repeats", "1", "--json"]
    assert main([*argv, "--set", "model.pair_sparsity=0.0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["overrides"] == ["model.pair_sparsity=0.0"] and result["kept_pair_fraction"] == 1  # no pair gate
    assert main([*argv, "--set", "model.dense=true"]) == 2
    assert "dense twin" in capsys.readouterr().err
    assert main([*argv, "--set", "model.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_bench_train_compiled_traces_both_models(capsys):
    """``--compile BACKEND`` runs both training-step models under torch.compile. Backend ``eager`` (dynamo's
    tracing without code generation) keeps this fast; a small model for the same reason."""
    argv = ["bench", "qh9", "--part", "train", "--train-molecules", "1", "--train-repeats", "1", "--json",
            "--compile", "eager", "--set", "model.layers=1", "--set", "model.node_irreps=8x0e+4x1o+4x2e+2x3o+2x4e"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result, summary = json.loads(out[-1]), "\n".join(out[:-1])
    assert result["train_compile_backend"] == "eager" and result["train_speedup"] > 0
    assert result["train_dense_first_steps_s"] > 0 and result["train_sparse_first_steps_s"] > 0
    assert result["train_dense_tp_s"] is None  # hooks cannot time inside a compiled graph
    assert 0 < result["kept_pair_fraction"] < 1  # counted by hooks on an eager step: the gates dropped pairs
    assert "torch.compile (eager)" in summary
    with pytest.raises(SystemExit) as exc:
        main([*argv[:-4], "--compile", "no_such_backend"])
    assert exc.value.code == 2 and "argument --compile: invalid choice: 'no_such_backend'" in capsys.readouterr().err


def test_compiled_training_matches_eager_and_starts_in_the_fixed_phase(water, tmp_path, capsys):
    """``train.compile``: the model is compiled once its kept paths are fixed, and training goes on as before.
    Backend ``eager`` (dynamo's tracing, the same kernels as eager) so that the logs must agree exactly and the
    test does not wait for code generation."""
    extra = {"train.batch_size": 4, "train.epochs": 6, "data.file": water}  # 2 steps per epoch, 12 in all
    phases = dict(random_steps=3, adaptive_steps=2)
    train(load_train_config(None, _sets(extra, **phases)), tmp_path / "eager", progress=False)
    assert "compiling" not in capsys.readouterr().err
    compiled = load_train_config(None, _sets({**extra, "train.compile": "eager"}, **phases))
    result = train(compiled, tmp_path / "compiled", progress=False)
    assert result["phase"] == "fixed" and result["steps"] == 12
    assert "compiling the model with torch.compile (eager)" in capsys.readouterr().err
    want, got = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [row["val_h_mae_ueh"] for row in got] == [row["val_h_mae_ueh"] for row in want]
    assert [row["phase"] for row in got] == [row["phase"] for row in want]
    with pytest.raises(ConfigError, match="train.compile.*one of none, inductor"):
        load_train_config(None, _sets({"train.compile": "fast"}))


def test_compiled_training_without_a_cpp_compiler_is_one_line_naming_the_key(water, tmp_path):
    """``train.compile=inductor`` where no C++ compiler works: exit 2 and a line naming the key and the way out,
    not torch's traceback. A dense model compiles at its first step. In a subprocess: inductor reads ``$CXX``
    when it is imported."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    sets = _sets({"data.file": water, "train.epochs": 1, "train.compile": "inductor"}, dense=True)
    argv = [sys.executable, "-m", "metaham", "qh9", "train", "--out", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run([*argv, *(a for s in sets for a in ("--set", s))], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("metaham qh9: error: train.compile=inductor: torch.compile failed")
    assert "no-such-g++" in last and "train.compile=aot_eager" in last
