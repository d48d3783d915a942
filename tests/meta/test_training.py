"""The meta-training loop: checkpoints, exact resume after an interruption, config validation."""
from pathlib import Path

import pytest
import torch
import yaml

from metaham.meta import MAML, training
from metaham.meta import config as meta_config
from metaham.train import ConfigError
from tasks.cache import derive_seed

TINY = Path(__file__).with_name("tiny_meta_train.yaml")


@pytest.fixture(autouse=True)
def _task_cache(tmp_path_factory, monkeypatch):
    # One pool cache for the whole session: the tiny pools are simulated once.
    monkeypatch.setenv("METAHAM_CACHE", str(tmp_path_factory.getbasetemp() / "metaham_cache"))


def _config(*overrides):
    return meta_config.load_meta_config(TINY, list(overrides))


def _assert_same_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for slot, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][slot][key]), (slot, key)


def _train_killed_in_step_3(config, run_dir, monkeypatch):
    """Train the meta-learner until a KeyboardInterrupt arrives inside its third outer loss."""
    calls = {"n": 0}
    original = MAML.meta_loss

    def interrupting(self, tasks):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, tasks)

    monkeypatch.setattr(MAML, "meta_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, run_dir, progress=False)
    monkeypatch.setattr(MAML, "meta_loss", original)


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    full = training.train(_config(), tmp_path / "full", progress=False)
    assert full["meta"].steps == full["pretrained"].steps == 4

    # Interrupt the meta-learner in its third outer step (after the step-2 checkpoint).
    _train_killed_in_step_3(_config(), tmp_path / "cut", monkeypatch)
    assert torch.load(tmp_path / "cut" / "meta.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "cut" / "pretrained.pt").exists()

    resumed = training.train(_config(), tmp_path / "cut", resume=True, progress=False)
    assert resumed["meta"].resumed_from == 2 and resumed["meta"].steps == 4
    assert resumed["pretrained"].resumed_from == 0
    for kind in meta_config.LEARNERS:
        a = torch.load(tmp_path / "full" / f"{kind}.pt", weights_only=True)
        b = torch.load(tmp_path / "cut" / f"{kind}.pt", weights_only=True)
        _assert_same_state(a, b)
    # The log holds each step once, with the losses of the uninterrupted run.
    full_log = training.read_log(tmp_path / "full", "meta")
    cut_log = training.read_log(tmp_path / "cut", "meta")
    assert [r["step"] for r in cut_log] == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in cut_log] == [r["loss"] for r in full_log]


def test_a_log_row_whose_window_spans_the_interruption_averages_all_its_steps(tmp_path, monkeypatch):
    """One log row per 4 steps, a checkpoint after step 2, a kill in step 3: the resumed row at step 4 is the
    mean of all four losses (the window of losses since the last row travels in the checkpoint)."""
    sets = ("train.log_every=4", "train.validate_every=0", "train.pretrain=false")
    training.train(_config(*sets), tmp_path / "full", progress=False)
    _train_killed_in_step_3(_config(*sets), tmp_path / "cut", monkeypatch)
    resumed = training.train(_config(*sets), tmp_path / "cut", resume=True, progress=False)
    full, cut = training.read_log(tmp_path / "full", "meta"), training.read_log(tmp_path / "cut", "meta")
    assert [r["step"] for r in cut] == [4] and cut[0]["loss"] == full[0]["loss"]
    assert resumed["meta"].final_loss == pytest.approx(full[0]["loss"])


def test_checkpoint_is_a_plain_dict_with_everything_to_continue(tmp_path):
    training.train(_config("train.pretrain=false", "maml.meta_sgd=true"), tmp_path, progress=False)
    assert not (tmp_path / "pretrained.pt").exists()
    state = torch.load(tmp_path / "meta.pt", weights_only=True)
    assert state["format"] == meta_config.CHECKPOINT_FORMAT and state["kind"] == "meta"
    assert state["step"] == state["outer_steps"] == 4
    assert set(state) >= {"model", "optimizer", "learner", "rng", "config", "split", "adapt", "model_config"}
    assert state["split"]["test_systems"] == ["pendulum"]
    # Meta-SGD: the learned inner rates are saved for adaptation and have moved away from their initial value.
    assert len(state["adapt"]["lrs"]) == len(state["adapt"]["names"]) == len(state["model"])
    assert any(not torch.all(lr == 0.3) for lr in state["adapt"]["lrs"])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["maml"]["meta_sgd"] is True and saved["train"]["pretrain"] is False
    log = training.read_log(tmp_path, "meta")
    assert [r["step"] for r in log if r["val_query_mse"] is not None] == [0, 2, 4]


def test_meta_and_pretrained_share_initialisation_and_batches_but_not_the_objective(tmp_path):
    training.train(_config("train.outer_steps=1"), tmp_path, progress=False)
    meta = torch.load(tmp_path / "meta.pt", weights_only=True)["model"]
    pre = torch.load(tmp_path / "pretrained.pt", weights_only=True)["model"]
    init = meta_config.initial_model(_config(), derive_seed("init", 0)).state_dict()
    # One Adam step moves every entry by at most ~lr from the shared start, and the two objectives move it differently.
    for name in init:
        assert (meta[name] - init[name]).abs().max() <= 1.01 * 5e-4
        assert (pre[name] - init[name]).abs().max() <= 1.01 * 5e-4
    assert any(not torch.equal(meta[name], pre[name]) for name in init)


SPARSE = ("model.backbone=equivariant", "model.options={tp_sparsity: 0.5}",
          "train.sparsity.random_steps=1", "train.sparsity.adaptive_steps=2")


def test_sparse_gates_go_through_their_phases_in_outer_steps_and_resume_exactly(tmp_path, monkeypatch):
    """With tp_sparsity > 0 the loop steps a SparsityScheduler once per outer step (random for 1 step under vmap,
    adaptive for 2, then fixed); an interrupted run resumes with the same step, phase and kept paths."""
    training.train(_config(*SPARSE), tmp_path / "full", progress=False)
    _train_killed_in_step_3(_config(*SPARSE), tmp_path / "cut", monkeypatch)
    cut = torch.load(tmp_path / "cut" / "meta.pt", weights_only=True)
    assert int(cut["sparsity"]["steps_done"]) == 2 and int(cut["sparsity"]["phase_index"]) == 1  # adaptive
    training.train(_config(*SPARSE), tmp_path / "cut", resume=True, progress=False)
    for kind in meta_config.LEARNERS:
        a = torch.load(tmp_path / "full" / f"{kind}.pt", weights_only=True)
        b = torch.load(tmp_path / "cut" / f"{kind}.pt", weights_only=True)
        _assert_same_state(a, b)
        assert int(a["sparsity"]["steps_done"]) == 4 and int(a["sparsity"]["phase_index"]) == 2  # fixed
        gates = [name[: -len(".phase_index")] for name in a["model"] if name.endswith("tp.phase_index")]
        assert gates and all(int(a["model"][f"{g}.phase_index"]) == 2 for g in gates)
        for g in gates:  # the kept set is the top half of the path weights the adaptive phase left
            weights, kept = a["model"][f"{g}.path_weight"], a["model"][f"{g}.kept_mask"]
            assert 0 < int(kept.sum()) < len(kept)
            assert weights[kept].min() >= weights[~kept].max()
    # Dense gates need no schedule: nothing to drive, nothing saved.
    training.train(_config("model.backbone=equivariant", "train.pretrain=false"), tmp_path / "dense",
                   progress=False)
    assert "sparsity" not in torch.load(tmp_path / "dense" / "meta.pt", weights_only=True)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.bogus=1", "train.bogus"),
        ("train.outer_steps=many", "train.outer_steps"),
        ("train.outer_steps=0", "train.outer_steps"),
        ("maml.inner_lr=-0.1", "maml.inner_lr"),
        ("model.backbone=transformer", "model.backbone"),
        ("tasks.k_support=0", "k_support"),
        ("tasks.dtype=float16", "dtype"),
        ("train.loss=l1", "train.loss"),
        ("train.task_scale=rms", "train.task_scale"),
        ("split=leave_nothing", "split"),
        ("device=tpu", "device"),
        ("train.sparsity.random_steps=-1", "train.sparsity.random_steps"),
        ("train.sparsity.adaptive_steps=1.5", "train.sparsity.adaptive_steps"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _config(override)


def test_a_config_may_name_a_backbone_by_its_former_name():
    config = _config("model.backbone=sparse_equivariant")
    assert meta_config.build_model(config["model"]).config["backbone"] == "equivariant"


def test_inline_split_and_missing_split(tmp_path):
    inline = "split={kind: explicit, train_systems: [mass_spring], test_systems: [pendulum]}"
    assert meta_config.resolve_split(_config(inline)["split"]).train_systems == ("mass_spring",)
    path = tmp_path / "no_split.yaml"
    path.write_text("train: {outer_steps: 2}\n")
    with pytest.raises(ConfigError, match="'split' is missing"):
        meta_config.load_meta_config(path)


def test_run_directory_rules(tmp_path):
    training.train(_config("train.outer_steps=1", "train.pretrain=false"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        training.train(_config("train.outer_steps=1"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="model.hidden"):
        training.train(_config("model.hidden=16"), tmp_path, resume=True, progress=False)
    with pytest.raises(ConfigError, match="config.yaml not found"):
        training.train(_config(), tmp_path / "elsewhere", resume=True, progress=False)


def test_held_in_validation_adapts_with_the_same_safeguard_as_metaham_adapt(monkeypatch):
    """At an inner rate far past the edge of stability, plain SGD sends the validation MSE through the roof; the
    safeguarded steps of `metaham adapt` (a step that would raise the support loss is halved) keep it near its
    start. Validation scores a model the way adaptation will."""
    config = _config("maml.inner_lr=200.0", "train.validate_steps=3")
    split = meta_config.resolve_split(config["split"])
    validation = training._validation_tasks(config, split, None, False)
    learner = meta_config.make_learner("pretrained", meta_config.initial_model(config, 0), config)
    # A vanishing rate leaves the model where it starts.
    at_start = training._validate(learner, validation, _config("maml.inner_lr=1.0e-12"), torch.device("cpu"))
    safeguarded = training._validate(learner, validation, config, torch.device("cpu"))
    monkeypatch.setattr(training, "BACKTRACK", 0)
    plain = training._validate(learner, validation, config, torch.device("cpu"))
    assert safeguarded <= 1.5 * at_start
    assert not plain < 100 * at_start  # plain SGD: far larger, or not a number at all
