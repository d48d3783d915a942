"""metaham.train.distributed with real gloo ranks on CPU, started by torchrun (tests/train/dist_worker.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metaham.train.distributed import (
    SINGLE_PROCESS,
    RankFailure,
    World,
    all_gather_objects,
    all_reduce_mean_,
    balanced_shards,
    collective,
    init_world,
    shard_slice,
)
from tests.train.dist_worker import regression_problem, sgd

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def torchrun(args: list[str], **env: str) -> subprocess.Popen:
    """Start ``python -m torch.distributed.run ARGS`` with one thread per rank and this checkout importable."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env}
    environ.pop("METAHAM_DIST_TIMEOUT", None)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args], env=environ, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out}")
    return proc.returncode, out


def run_ranks(scenario: str, out: Path, **env: str) -> tuple[int, str, dict[int, dict]]:
    """Two ranks of ``scenario`` on one node; (exit status, output, {rank: what it wrote})."""
    code, text = finish(torchrun(["--standalone", "--nproc_per_node", "2", str(WORKER), scenario, str(out)], **env))
    return code, text, {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def float64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_slice_covers_every_index_once_in_rank_order():
    for n in range(0, 23):
        for size in range(1, 6):
            parts = [shard_slice(n, World(rank, size, rank, "gloo")) for rank in range(size)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            lengths = [p.stop - p.start for p in parts]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_balanced_shards_cover_every_item_once_and_balance_the_cost():
    rng = np.random.default_rng(0)
    for n in range(1, 30):
        for size in range(1, 5):
            costs = rng.integers(4, 30, n) ** 2 + 6.0
            shards = balanced_shards(costs.tolist(), size)
            assert len(shards) == size and sorted(i for s in shards for i in s) == list(range(n))
            assert all(s == sorted(s) for s in shards)
            loads = [costs[s].sum() for s in shards]
            if n >= size:
                assert all(shards)
                # Greedy longest-first: the heaviest shard exceeds the lightest by at most one item's cost.
                assert max(loads) - min(loads) <= costs.max()
    assert balanced_shards([9.0, 1.0, 1.0, 1.0, 4.0], 2) == [[0], [1, 2, 3, 4]]
    assert balanced_shards([1.0, 2.0, 3.0], 1) == [[0, 1, 2]]
    # A contiguous split of the same batch leaves one rank 3x the other's work.
    costs = [9.0, 8.0, 7.0, 1.0, 2.0, 3.0]
    assert [sum(costs[i] for i in s) for s in balanced_shards(costs, 2)] == [15.0, 15.0]


def test_single_process_initialises_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    world = init_world("cpu")
    assert world == SINGLE_PROCESS == World(0, 1, 0, None)
    assert world.is_main and not world.distributed and not torch.distributed.is_initialized()
    assert world.device_for("cpu") == torch.device("cpu")
    assert World(1, 2, 1, "nccl").device_for("cuda") == torch.device("cuda", 1)
    assert World(1, 2, 1, "nccl").device_for("cuda:0") == torch.device("cuda", 0)
    t = torch.ones(2)
    all_reduce_mean_([t], world)
    assert t.tolist() == [1.0, 1.0] and all_gather_objects("x", world) == ["x"]
    with pytest.raises(ValueError, match="missing RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        init_world("cpu", force=True)
    monkeypatch.setenv("METAHAM_DIST_TIMEOUT", "soon")
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)  # refused before any connection is tried
    with pytest.raises(ValueError, match="METAHAM_DIST_TIMEOUT='soon'"):
        init_world("cpu")


def test_collective_names_the_operation_and_the_rank():
    with pytest.raises(RankFailure, match=r"rank 1 of 2: all_reduce failed: .*within 5 s \(RuntimeError: boom\)"):
        with collective("all_reduce", World(1, 2, 1, "gloo", 5.0)):
            raise RuntimeError("boom")


@pytest.mark.slow  # torchrun and two ranks importing torch: ~10 s on a busy 2-core machine
def test_two_gloo_ranks_collectives_and_ddp_match_one_process(tmp_path):
    code, text, ranks = run_ranks("collectives", tmp_path)
    assert code == 0, text
    assert sorted(ranks) == [0, 1]
    model, x, y = regression_problem()
    alone = sgd(model, x, y)
    for rank, seen in ranks.items():
        assert seen["world"] == [rank, 2, rank, "gloo", 30.0] and seen["current"] == seen["world"]
        assert seen["shards"] == {"0": [0, 0], "1": [0, 1] if rank == 0 else [1, 1], "5": [[0, 3], [3, 5]][rank],
                                  "7": [[0, 4], [4, 7]][rank], "8": [[0, 4], [4, 8]][rank]}
        assert seen["mean"] == [[[1.5] * 3] * 2, [1.0]]  # (1 + 2) / 2 and (0 + 2) / 2 are exact
        assert seen["broadcast"] == [11.0]
        # Mean loss; a gradient missing on one rank counts as zero there; none anywhere stays none.
        assert seen["step"] == [1.5, [2.0, -1.0], None]
        assert seen["weights"] == {"2": 0.8, "3": 1.2}  # (0.8 + 1.2) / 2 = 1: the shards' means weigh as 2 : 3
        assert seen["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert seen["gathered_at_0"] == ([0, 3] if rank == 0 else None)
        # close_world freed the group and joined gloo's threads, although DDP's first use imported torch._dynamo
        # (see _import_group_defaults_first): a thread left over can abort the interpreter's exit.
        assert seen["threads"][1] == seen["threads"][0], seen["threads"]
        # Two half batches averaged by DDP against the full batch: equal up to float64 round-off.
        for key, value in seen["ddp"].items():
            torch.testing.assert_close(float64(value), float64(alone[key]), rtol=0, atol=1e-12)
    initial = regression_problem()[0].state_dict()
    assert max(float((float64(alone[k]) - v).abs().max()) for k, v in initial.items()) > 1e-2  # it trained


def test_a_rank_that_exits_makes_the_other_raise_rank_failure_at_once(tmp_path):
    code, text, ranks = run_ranks("exit", tmp_path, TEST_TIMEOUT_S="20")
    assert code != 0 and list(ranks) == [0], text
    seen = ranks[0]
    assert seen["type"] == "RankFailure" and seen["error"].startswith("rank 0 of 2: all_reduce failed"), seen
    assert seen["seconds"] < 20  # the connection closed: no need to wait for the 20 s timeout


@pytest.mark.slow  # torchrun and two ranks importing torch: ~10 s on a busy 2-core machine
def test_a_rank_that_stops_answering_makes_the_other_raise_after_the_timeout(tmp_path):
    start = time.monotonic()
    code, text, ranks = run_ranks("stall", tmp_path, TEST_TIMEOUT_S="3")
    assert code != 0 and list(ranks) == [0], text
    seen = ranks[0]
    assert seen["type"] == "RankFailure" and "within 3 s" in seen["error"], seen
    assert 2.5 < seen["seconds"] < 30 and time.monotonic() - start < 60


@pytest.mark.slow  # torchrun and two ranks importing torch: ~10 s on a busy 2-core machine
def test_two_nodes_meet_through_c10d_rendezvous(tmp_path):
    """Two torchrun agents, one process each, as if on two machines: the c10d rendezvous on localhost joins them."""
    endpoint = f"localhost:{free_port()}"
    args = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
            "--rdzv_id", "metaham-test", str(WORKER), "hello", str(tmp_path)]
    nodes = [torchrun(args) for _ in range(2)]
    results = [finish(node) for node in nodes]
    assert all(code == 0 for code, _ in results), results
    seen = {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert {rank: ranks["world"] for rank, ranks in seen.items()} == {0: [0, 2], 1: [1, 2]}
    assert all(ranks["threads"][1] == ranks["threads"][0] for ranks in seen.values()), seen  # group freed
