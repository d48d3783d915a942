"""``metaham bench qh9 --part eval``: both routes evaluate the same model on the same file, their metrics agree to
the float32 rounding of the model, and the run reports the whole route and its parts."""
import json

import pytest

from metaham.cli import main
from metaham.qh9.train import DEFAULT_CONFIG, load_train_config


def test_eval_bench_times_both_routes_and_they_agree(capsys):
    argv = ["bench", "qh9", "--part", "eval", "--molecules", "1", "--conformers", "3", "--repeats", "1", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result, summary = json.loads(out[-1]), "\n".join(out[:-1])
    assert result["n_molecules"] == 3
    assert result["eval_batch_size"] == load_train_config(DEFAULT_CONFIG)["train"]["eval_batch_size"]
    assert result["eval_model_dtype"] == "float32"
    # The routes really ran different precisions (float32 batched vs float64 one at a time) and agree: to rounding,
    # except where a pair gate's near-tie keeps a pair in one precision only (a percent of one block at most).
    assert result["eval_max_matrix_diff_eh"] > 0 and result["eval_max_matrix_rel_diff"] < 0.05
    assert result["eval_max_energy_diff_ueh"] < 1.0 and result["eval_max_psi_diff_pct"] < 1e-3
    for key in ("reference", "batched", "reference_forward", "batched_forward", "reference_metrics", "batched_metrics"):
        assert result[f"eval_{key}_s"] > 0, key
    assert result["eval_speedup"] == pytest.approx(result["eval_reference_s"] / result["eval_batched_s"])
    # Both routes ran at one thread and at all of torch's; each is scored at its faster setting.
    by_threads = result["eval_by_threads"]
    assert set(by_threads) == {"1", str(result["eval_threads"])}
    for route in ("reference", "batched"):
        assert result[f"eval_{route}_s"] == min(times[f"{route}_s"] for times in by_threads.values())
        chosen = by_threads[str(result[f"eval_{route}_threads"])]
        assert result[f"eval_{route}_forward_s"] == chosen[f"{route}_forward_s"]
    assert "eval_speedup" in summary and "forward ms/mol" in summary and "1 molecule at a time" in summary
    assert "threads" in summary


def test_eval_bench_with_the_cuequivariance_backend_agrees_with_qh9s_route(capsys):
    pytest.importorskip("cuequivariance_torch")
    argv = ["bench", "qh9", "--part", "eval", "--molecules", "1", "--conformers", "2", "--repeats", "1",
            "--tp-backend", "cuequivariance", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["eval_tp_backend"] == "cuequivariance"
    assert result["eval_max_matrix_rel_diff"] < 0.05 and result["eval_max_energy_diff_ueh"] < 1.0
    assert "run by cuequivariance" in "\n".join(out[:-1])
