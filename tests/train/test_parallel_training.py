"""Data-parallel training with real gloo ranks on CPU: `metaham qh9 train` and `metaham meta-train` under
torchrun make the updates of one process with the same global batch, select the same sparse paths on every
rank, resume with another number of ranks, and stop with a message when a rank dies.

Every run goes through tests/train/train_worker.py (float64; it records the kept paths after each step).

Tolerance of the equivalence: the ranks' gradients differ from one process's only by the order of float64
sums (each rank sums its shard, the all-reduce adds the shards), a relative 1e-16 per step, which Adam and
20-odd steps amplify (its update divides by sqrt(v) + eps). Measured on these configs: weights of order 0.1-1
agree to 2.5e-13 (QH9) and 6e-17 (meta-training) at most. atol 1e-10 (plus rtol 1e-9) keeps a margin of 400
above that, and a real error -- a shard weighted wrongly, a gradient averaged twice, a rank on another
batch -- changes the gradients at their first digits (breaking the shard weighting makes both tests fail).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaham.qh9 import generate as gen
from tests.train.test_distributed import ROOT, finish, free_port, torchrun

WORKER = Path(__file__).with_name("train_worker.py")
TINY_META = ROOT / "tests" / "meta" / "tiny_meta_train.yaml"
QH9_CONFIG = ROOT / "configs" / "qh9.yaml"  # this checkout's, named: the installed package may ship another
RTOL, ATOL = 1e-9, 1e-10

# A tiny sparse QH9 model through all three phases within 21 steps (8 training rows, global batch 3: batches
# of 3, 3 and 2 molecules, so the two ranks' shards are unequal: 2 + 1 and 1 + 1).
QH9_MODEL = dict(node_irreps="8x0e+4x1o+4x2e+2x3o+2x4e", layers=2, lmax_sh=2, radial_hidden=16, pair_channels=4,
                 head_mul=4, head_hidden=16, random_steps=5, adaptive_steps=8, residual=False)
QH9_TRAIN = {"train.batch_size": 3, "train.warmup_steps": 5, "train.lr": 0.01, "train.decay": "none",
             "data.split_by": "stable-id", "threads": 1, "device": "cpu"}
QH9_EPOCHS = 7  # 3 steps each
META = {"train.outer_steps": 20, "train.meta_batch": 3, "train.checkpoint_every": 10, "train.log_every": 5,
        "train.validate_every": 10, "tasks.dtype": "float64"}


def _sets(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]


def _launch(out: Path, args: list[str], ranks: int) -> tuple[int, str, dict[int, dict]]:
    """``metaham ARGS`` on ``ranks`` processes (torchrun for two, a plain process for one); (exit status, output,
    {rank: what the worker recorded})."""
    if ranks == 1:
        environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.Popen([sys.executable, str(WORKER), str(out), *args], env=environ, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    else:
        proc = torchrun(["--standalone", "--nproc_per_node", str(ranks), str(WORKER), str(out), *args])
    code, text = finish(proc, timeout=240)
    return code, text, {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def _json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    key = "model" if "model" in sa and "learner" not in sa else "learner"
    assert sa[key].keys() == sb[key].keys()
    for name in sa[key]:
        x, y = sa[key][name], sb[key][name]
        if x.is_floating_point():
            assert x.dtype == torch.float64, name
            torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=name)
        else:
            assert torch.equal(x, y), name
    for slot, state in sa["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(v, sb["optimizer"]["state"][slot][k], rtol=RTOL, atol=ATOL, msg=f"{slot} {k}")


# -- QH9 ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def water(tmp_path_factory) -> Path:
    """Ten displaced water geometries with QH9's pyscf settings (stable-id split: 8 train, 1 val, 1 test)."""
    path = tmp_path_factory.mktemp("water") / "water.db"
    gen.generate(path, gen.g2_molecules(["H2O"]), conformers=10, displacement=0.1, progress=False)
    return path


def _qh9(water: Path, out: Path, ranks: int, epochs: int, resume: bool = False) -> tuple[dict, dict[int, dict]]:
    args = ["qh9", "train", "--out", str(out / "run"), "--json",
            *_sets({**{f"model.{k}": v for k, v in QH9_MODEL.items()}, **QH9_TRAIN, "train.epochs": epochs})]
    # A resumed run reads its saved config.yaml (data file included).
    args += ["--resume"] if resume else ["--config", str(QH9_CONFIG), "--data", str(water)]
    code, text, seen = _launch(out / f"ranks{ranks}-{epochs}", args, ranks)
    assert code == 0, text
    return _json(text), seen


@pytest.fixture(scope="module")
def qh9_runs(water, tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    """One process and two ranks, the same global batch, 21 steps each."""
    runs = {}
    for label, ranks in (("one", 1), ("two", 2)):
        out = tmp_path_factory.mktemp(f"qh9-{label}")
        result, seen = _qh9(water, out, ranks, QH9_EPOCHS)
        runs[label] = (out / "run", result, seen)
    return runs


@pytest.mark.slow  # two QH9 runs of 21 steps, one on two ranks: ~40 s on a busy 2-core machine
def test_qh9_two_ranks_make_the_updates_of_one_process(qh9_runs):
    (one, r1, _), (two, r2, _) = qh9_runs["one"], qh9_runs["two"]
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r1["steps"] == r2["steps"] == 3 * QH9_EPOCHS and r2["phase"] == "fixed"
    _assert_same_weights(one / "last.pt", two / "last.pt")
    assert r2["last_val_h_mae_ueh"] == pytest.approx(r1["last_val_h_mae_ueh"], rel=1e-9)
    # Rank 0 alone wrote: one log, one row per epoch.
    assert len((two / "log.csv").read_text().splitlines()) == 1 + 1 + QH9_EPOCHS


@pytest.mark.slow  # shares the runs of the test above
def test_qh9_ranks_select_the_same_paths_in_every_phase(qh9_runs):
    one, two = qh9_runs["one"][2], qh9_runs["two"][2]
    assert len(two[0]["kept"]) == 3 * QH9_EPOCHS
    phases = QH9_MODEL["random_steps"], QH9_MODEL["adaptive_steps"]
    assert [p for p, _ in two[0]["kept"]] == ["random"] * (phases[0] - 1) + ["adaptive"] * phases[1] + ["fixed"] * (
        3 * QH9_EPOCHS - sum(phases) + 1)
    assert two[0]["kept"] == two[1]["kept"]  # the adaptive phase re-selects after every step: the same on both
    assert two[0]["kept"] == one[0]["kept"]


@pytest.mark.slow  # two more QH9 runs: ~30 s
def test_qh9_run_of_two_ranks_resumes_on_one(qh9_runs, water, tmp_path):
    _qh9(water, tmp_path, 2, 3)
    result, _ = _qh9(water, tmp_path, 1, QH9_EPOCHS, resume=True)
    assert result["steps"] == 3 * QH9_EPOCHS and result["world_size"] == 1
    _assert_same_weights(qh9_runs["one"][0] / "last.pt", tmp_path / "run" / "last.pt")


# -- meta-training -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_cache(tmp_path_factory):
    # One pool cache: the first (single-process) run simulates the pools, the ranks after it only read them.
    path = tmp_path_factory.mktemp("metaham_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAHAM_CACHE", str(path))
        yield path


def _meta(out: Path, ranks: int, steps: int, resume: bool = False) -> dict:
    args = ["meta-train", "--config", str(TINY_META), "--out", str(out / "run"), "--json", "--no-progress",
            *_sets({**META, "train.outer_steps": steps}), *(["--resume"] if resume else [])]
    code, text, _ = _launch(out / f"ranks{ranks}-{steps}", args, ranks)
    assert code == 0, text
    return _json(text)


@pytest.fixture(scope="module")
def meta_one(task_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta-one")
    assert _meta(out, 1, 20)["world_size"] == 1
    return out / "run"


@pytest.mark.slow  # two meta-training runs of 20 steps, one on two ranks: ~25 s
def test_meta_two_ranks_make_the_updates_of_one_process(meta_one, tmp_path):
    result = _meta(tmp_path, 2, 20)
    assert result["world_size"] == 2 and result["learners"]["meta"]["steps"] == 20
    for kind in ("meta", "pretrained"):
        _assert_same_weights(meta_one / f"{kind}.pt", tmp_path / "run" / f"{kind}.pt")


@pytest.mark.slow  # two more meta-training runs: ~25 s
def test_meta_run_of_one_process_resumes_on_two_ranks(meta_one, tmp_path):
    _meta(tmp_path, 1, 10)
    result = _meta(tmp_path, 2, 20, resume=True)
    assert result["learners"]["meta"]["resumed_from"] == 10 and result["world_size"] == 2
    for kind in ("meta", "pretrained"):
        _assert_same_weights(meta_one / f"{kind}.pt", tmp_path / "run" / f"{kind}.pt")


@pytest.mark.slow  # two ranks importing torch and simulating pools: ~15 s
def test_a_killed_rank_makes_the_other_exit_with_a_rank_failure(task_cache, tmp_path):
    """Two ranks as on two machines (no torchrun agent to stop the survivor): rank 1 is SIGKILLed in its third
    step; rank 0 must report it in one line and exit 1 instead of waiting."""
    port = str(free_port())
    args = ["meta-train", "--config", str(TINY_META), "--out", str(tmp_path / "run"), "--no-progress",
            *_sets({**META, "train.pretrain": "false"})]
    procs = []
    for rank in (0, 1):
        environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port, "DIE_AT_STEP": "3", "METAHAM_DIST_TIMEOUT": "30"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "seen"), *args], env=environ,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    (code0, text0), (code1, _) = (finish(p, timeout=120) for p in procs)
    assert code1 == -signal.SIGKILL
    assert code0 == 1, text0
    last = text0.strip().splitlines()[-1]
    assert last.startswith("metaham meta-train: error: rank failure: rank 0 of 2: all_reduce failed"), text0


# -- refusals ------------------------------------------------------------------------------------------------
def test_more_ranks_than_molecules_or_tasks_in_a_batch_is_refused_before_the_run_starts(water, task_cache, tmp_path):
    """A rank without items would skip its forward pass (and the random draws that keep the ranks in step):
    refused, naming the key to change, before anything is written or any collective runs."""
    from metaham.meta import training
    from metaham.meta.config import load_meta_config
    from metaham.qh9.train import load_train_config, train
    from metaham.train import ConfigError
    from metaham.train.distributed import World

    nine = World(rank=0, size=9, backend="gloo")  # never joins a group: the refusal comes first
    sets = [f"{k}={v}" for k, v in {**{f"model.{k}": v for k, v in QH9_MODEL.items()}, **QH9_TRAIN,
                                    "data.file": water}.items()]
    with pytest.raises(ConfigError, match=r"9 ranks need at least 9 molecules .* train.batch_size=3 one batch holds 2"):
        train(load_train_config(QH9_CONFIG, sets), tmp_path / "qh9", world=nine)
    config = load_meta_config(TINY_META, ["train.meta_batch=3"])
    with pytest.raises(ConfigError, match=r"9 ranks need train.meta_batch >= 9"):
        training.train(config, tmp_path / "meta", world=nine)
    assert not (tmp_path / "qh9").exists() and not (tmp_path / "meta").exists()
