"""`torchrun --nproc_per_node 2 -m metaham qh9 eval`: two gloo ranks score halves of the molecules and report
what one process reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metaham.bench import torch_threads
from metaham.cli import main
from metaham.qh9 import generate as gen
from metaham.qh9.train import load_train_config, train
from tests.qh9.test_qh9_train import _sets

ROOT = Path(__file__).resolve().parents[2]


def _torchrun_2(args: list[str]) -> tuple[dict, list[str]]:
    """``torchrun --nproc_per_node 2 -m metaham ARGS --json``, one thread per rank; (last JSON line, stdout)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "metaham", *args, "--json"]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines


@pytest.mark.slow
def test_two_ranks_report_the_metrics_of_one_process(tmp_path, capsys):
    data = tmp_path / "h2.db"
    gen.generate(data, gen.g2_molecules(["H2"]), conformers=10, displacement=0.1, progress=False)
    train(load_train_config(None, _sets({"train.epochs": 1, "data.file": data})), tmp_path / "run", progress=False)
    # 10 molecules in 4 batches of 3: rank 0 scores 6 of them, rank 1 the other 4.
    args = ["qh9", "eval", "--checkpoint", str(tmp_path / "run"), "--split", "all", "--batch-size", "3",
            "--device", "cpu"]
    with torch_threads(1):  # as each rank runs
        assert main([*args, "--save-predictions", str(tmp_path / "one.npz"), "--json"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    two, lines = _torchrun_2([*args, "--save-predictions", str(tmp_path / "two.npz")])
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["n"] == 10
    assert sum(line.startswith("{") for line in lines) == 1 and "on 2 ranks" in "\n".join(lines)  # rank 0 alone
    metrics = [k for k, v in one.items() if isinstance(v, float)]
    assert "h_mae_ueh" in metrics and "psi_cos_pct" in metrics
    # Same batches, same kernels: only the grouping of the float64 eigensolves may differ between the runs.
    assert {k: two[k] for k in metrics} == pytest.approx({k: one[k] for k in metrics}, rel=1e-9, abs=0)
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["ids"].tolist() == b["ids"].tolist() == list(range(1, 11))
    for i in a["ids"]:
        np.testing.assert_allclose(b[f"H_{i}"], a[f"H_{i}"], rtol=1e-6, atol=1e-9)
