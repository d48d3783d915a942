"""The engine's pieces on their own: run directory rules, the CSV log, devices, RNG state, the step loop."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from metaham.train import ConfigError
from metaham.train.checkpoint import capture_state, load_checkpoint, restore_state, save_checkpoint
from metaham.train.device import resolve_device, set_threads
from metaham.train.log import CsvLog, read_log
from metaham.train.loop import Clock, LoopSettings, run_loop
from metaham.train.run import RunSpec, changed_keys, start_run
from metaham.train.distributed import World

SCHEMA = {"model": {"width": 4, "split": None}, "train": {"steps": 3, "lr": 0.1}, "device": "cpu", "threads": 0}
SPEC = RunSpec(command="test train", schema=SCHEMA, validate=lambda config, source: None, checkpoint_format="test",
               checkpoints=("last.pt",), resumable=frozenset({"train.steps"}), resume_needs="last.pt",
               whole_keys=frozenset({"model.split"}))


def _config(**train):
    return {"model": {"width": 4, "split": {"a": 1}}, "train": {"steps": 3, "lr": 0.1, **train}, "device": "cpu",
            "threads": 0}


def test_changed_keys_are_dotted_sorted_and_whole_keys_stay_whole():
    a = {"m": {"x": 1, "s": {"p": 1, "q": 2}}, "b": 1}
    b = {"m": {"x": 2, "s": {"p": 0, "q": 3}}, "b": 1, "c": 0}
    assert changed_keys(a, b) == ["c", "m.s.p", "m.s.q", "m.x"]
    assert changed_keys(a, b, frozenset({"m.s"})) == ["c", "m.s", "m.x"]


def test_resume_refuses_changed_keys_and_names_every_one(tmp_path):
    run = start_run(tmp_path, _config(), SPEC, resume=False)
    run.save("last.pt", {"step": 0})
    with pytest.raises(ConfigError, match="already holds a run"):
        start_run(tmp_path, _config(), SPEC, resume=False)
    changed = {**_config(lr=0.2), "model": {"width": 8, "split": {"a": 2}}}
    with pytest.raises(ConfigError) as err:
        start_run(tmp_path, changed, SPEC, resume=True)
    assert "'model.split'" in str(err.value) and "'model.width'" in str(err.value) and "'train.lr'" in str(err.value)
    assert "3 key(s)" in str(err.value)
    assert start_run(tmp_path, _config(steps=9), SPEC, resume=True).config["train"]["steps"] == 9
    with pytest.raises(ConfigError, match="nothing to resume"):
        (tmp_path / "last.pt").unlink()
        start_run(tmp_path, _config(), SPEC, resume=True)


def test_a_process_that_is_not_main_writes_nothing(tmp_path):
    run = start_run(tmp_path / "r", _config(), SPEC, resume=False, world=World(rank=1, size=2))
    run.save("last.pt", {"step": 1})
    with run.log("log.csv", ("step", "loss"), keep_through=None, tags={}) as log:
        log.write({"step": 1, "loss": 0.5})
    assert not (tmp_path / "r").exists()


def test_log_header_once_and_resume_drops_rows_past_the_checkpoint(tmp_path):
    path = tmp_path / "log.csv"
    with CsvLog(path, ("step", "loss", "phase"), formats={"loss": ".3f"}) as log:
        for step in range(5):
            log.write({"step": step, "loss": step / 3, "phase": "random" if step else None})
    with CsvLog(path, ("step", "loss", "phase"), keep_through=2) as log:
        log.write({"step": 3, "loss": 9.0})
    assert path.read_text().count("step,loss,phase") == 1
    rows = read_log(path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["phase"] is None and rows[1]["phase"] == "random" and rows[1]["loss"] == 0.333
    with pytest.raises(KeyError, match="nope"):
        CsvLog(path, ("step",)).write({"step": 1, "nope": 2})


def test_resolve_device_and_threads():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="expected auto, cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")
    before = torch.get_num_threads()
    set_threads(0)
    assert torch.get_num_threads() == before


def test_cli_device_errors_are_usage_errors():
    from metaham.errors import UsageError
    from metaham.options import resolve_device as cli_device

    with pytest.raises(UsageError, match="^--device 'tpu'"):
        cli_device("tpu")


def test_checkpoint_state_restores_every_generator_through_a_weights_only_file(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(capture_state({"model": model, "optimizer": optimizer}), tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    other = torch.nn.Linear(3, 2)
    other_optimizer = torch.optim.Adam(other.parameters())
    restore_state(load_checkpoint(tmp_path / "c.pt"), {"model": other, "optimizer": other_optimizer})
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert torch.equal(other.weight, model.weight)
    assert other_optimizer.state_dict()["state"][0]["step"] == 1


class _Job:
    """A least-squares fit: enough of a half to drive the loop."""

    name, failure_hint = "toy", "lower the lr"

    def __init__(self, total=6, stop_at=None):
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.optimizer = torch.optim.SGD([self.weight], lr=0.1)
        self.schedulers, self.saved, self.total, self.stop_at = [], [], total, stop_at

    def parameters(self):
        return [self.weight]

    def batches(self, step):
        for s in range(step, self.total):
            if s == self.stop_at:
                raise KeyboardInterrupt
            yield torch.full((2,), float(s))

    def loss(self, batch, step):
        return ((self.weight - batch) ** 2).sum()

    def after_step(self, step, loss, clock):
        return False

    def save(self, step, seconds):
        self.saved.append(step)

    def postfix(self):
        return ""


class _Averaging(World):
    def average_gradients(self, parameters, loss):
        # Where a data-parallel world all-reduces: the gradients are there, the optimizer has not run.
        for p in parameters:
            assert p.grad is not None
            p.grad /= 2
        return float(loss.detach())


def test_loop_checkpoints_periodically_at_the_end_and_on_interrupt_between_steps():
    job = _Job()
    outcome = run_loop(job, LoopSettings(total_steps=6, checkpoint_every=4, progress=False))
    assert (outcome.steps, outcome.stopped, job.saved) == (6, "steps", [4, 6])
    cut = _Job(stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_loop(cut, LoopSettings(total_steps=6, progress=False))
    assert cut.saved == [3]


def test_loop_stops_on_the_clock_and_the_world_sees_gradients_before_the_update():
    job = _Job()
    outcome = run_loop(job, LoopSettings(total_steps=6, max_minutes=1e-9, progress=False), seconds=5.0)
    assert (outcome.steps, outcome.stopped, job.saved) == (1, "max_minutes", [1]) and outcome.seconds >= 5.0
    plain, halved = _Job(total=1), _Job(total=1)
    run_loop(plain, LoopSettings(total_steps=1, progress=False))
    run_loop(halved, LoopSettings(total_steps=1, progress=False), world=_Averaging(rank=0, size=1))
    assert torch.equal(halved.weight.detach(), plain.weight.detach() / 2)
    assert Clock(0.0).expired() is False


def test_a_non_finite_loss_names_the_half_and_the_hint():
    job = _Job()
    job.loss = lambda batch, step: torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(FloatingPointError, match="toy: the training loss became nan at step 1; lower the lr"):
        run_loop(job, LoopSettings(total_steps=6, progress=False))
