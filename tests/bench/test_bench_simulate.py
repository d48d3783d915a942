"""`metaham bench simulate`: the scipy baseline solves the same equations, and the benchmark runs end to end."""
import argparse

import numpy as np
import pytest
import torch

import systems
from metaham.bench import simulate as bench


@pytest.mark.parametrize("name", ["henon_heiles", "magnetic_mirror", "mass_spring", "pendulum", "spring_chain",
                                  "three_body", "two_body"])
def test_numpy_baseline_right_hand_side_equals_the_torch_vector_field(name):
    system = systems.get(name)
    g = torch.Generator().manual_seed(0)
    params = system.sample_params(3, g)
    q, p = system.sample_initial_state(params, g)
    dq, dp = system.vector_field(q, p, params)
    for b in range(3):
        rhs = bench._numpy_rhs(system, {k: float(v[b]) for k, v in params.items()})
        y = np.concatenate([q[b].numpy().ravel(), p[b].numpy().ravel()])
        expected = np.concatenate([dq[b].numpy().ravel(), dp[b].numpy().ravel()])
        np.testing.assert_allclose(rhs(0.0, y), expected, rtol=1e-12, atol=1e-12)


def test_bench_reports_both_sides_at_the_target_accuracy():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--systems", "mass_spring", "--n-traj", "6", "--scipy-traj", "3", "--repeats", "1",
                              "--n-points", "20", "--t-end", "3"])
    summary, result = bench.run(args)
    entry = result["systems"]["mass_spring"]
    assert list(entry["scipy"]) == ["LSODA", "DOP853", "RK45"]
    assert entry["ours_max_error"] <= 1e-7 and all(m["max_error"] <= 1e-7 for m in entry["scipy"].values())
    assert entry["reference_check"] < 1e-9  # the reference agrees with an independent solver
    times = {name: m["time_s"] for name, m in entry["scipy"].items()}
    assert entry["fastest_scipy_method"] == min(times, key=times.get)
    assert entry["speedup_vs_fastest"] == pytest.approx(times[entry["fastest_scipy_method"]] / entry["ours_time_s"])
    assert result["speedup_min"] == entry["speedup_vs_fastest"] > 0
    assert "mass_spring" in summary and "scaled" in summary and "fastest" in summary
