"""Hostile inputs to every command: each gives exit 2, one line on stderr naming the culprit, no traceback, and
writes nothing.

Each case is ``(argv, culprit)``: the command line (``{tmp}`` is this test's folder, holding the files that
:func:`hostile_files` makes) and a piece of text the message must contain. The command runs in-process through
``metaham.cli.main``, so an exception that escapes the CLI's error path fails the test with its traceback.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import systems
from metaham.cli import main
from metaham.errors import PluginError

ROOT = Path(__file__).resolve().parents[2]
TINY_META = str(ROOT / "tests" / "meta" / "tiny_meta_train.yaml")
PROGRESS_BAR = re.compile(r"^[\w ]*:\s+\d+%\|")
NAN_VECTOR_FIELD = "return surplus_pad(px / m * float('nan')), surplus_pad(-alpha * x - beta * x**3)"
# The Duffing example whose vector_field raises (a bug in a user's plugin), and the line that raises.
FIELD_DEF = "    def vector_field(self, q, p, params):\n"
_DUFFING = (ROOT / "examples" / "duffing.py").read_text()
FIELD_RAISES = _DUFFING.replace('name = "duffing"', 'name = "field_raises"').replace(
    FIELD_DEF, FIELD_DEF + "        raise RuntimeError('field boom')\n")
FIELD_RAISES_LINE = FIELD_RAISES.splitlines().index("        raise RuntimeError('field boom')") + 1

CASES = [
    # plugins
    (["simulate", "--system", "pendulum", "--plugin", "{tmp}/raises.py"], "raises.py, line 2: RuntimeError: boom"),
    (["simulate", "--system", "pendulum", "--plugin", "{tmp}/syntax.py"], "syntax.py, line 1: SyntaxError"),
    (["simulate", "--system", "pendulum", "--plugin", "{tmp}/empty.py"], "empty.py: registered no system"),
    (["simulate", "--system", "pendulum", "--plugin", "{tmp}/missing.py"], "missing.py: no such file"),
    (["simulate", "--system", "pendulum", "--plugin", "{tmp}/duplicate.py"], "'pendulum' is already taken"),
    (["simulate", "--system", "nan_duffing", "--plugin", "{tmp}/nan.py", "--out", "{tmp}/out.npz"],
     "trajectory 0 is not finite"),
    (["adapt", "--checkpoint", "{tmp}/run", "--plugin", "{tmp}/nan.py", "--system", "nan_duffing", "--shots", "5",
      "--steps", "1", "--tasks", "2", "--no-progress"], "nan_duffing: simulating its task pool"),
    # a plugin whose own code fails once it runs: its file and line, whichever command calls it
    (["simulate", "--system", "field_raises", "--plugin", "{tmp}/field_raises.py", "--out", "{tmp}/out.npz"],
     f"field_raises.py, line {FIELD_RAISES_LINE}: RuntimeError: field boom (run with --debug"),
    (["simulate", "--system", "field_raises", "--plugin", "{tmp}/field_raises.py", "--integrator", "dop853"],
     f"field_raises.py, line {FIELD_RAISES_LINE}: RuntimeError: field boom"),
    (["adapt", "--checkpoint", "{tmp}/run", "--plugin", "{tmp}/field_raises.py", "--system", "field_raises",
      "--shots", "5", "--steps", "1", "--tasks", "2", "--no-progress"],
     f"field_raises.py, line {FIELD_RAISES_LINE}: RuntimeError: field boom"),
    # simulate: values and output locations
    (["simulate", "--system", "nosuch"], "unknown system 'nosuch'"),
    (["simulate", "--system", "pendulum", "--param", "g=nan"], "'g'"),
    (["simulate", "--system", "pendulum", "--param", "g=abc"], "'abc' is not a number"),
    (["simulate", "--system", "pendulum", "--param", "warp=1"], "unknown parameter 'warp'"),
    (["simulate", "--system", "pendulum", "--param", "g"], "expected key=value"),
    (["simulate", "--system", "pendulum", "--n-points", "1"], "--n-points"),
    (["simulate", "--system", "pendulum", "--out", "{tmp}/a_file/x.npz"], "a_file is a file, not a folder"),
    (["simulate", "--system", "pendulum", "--out", "{tmp}/a_folder"], "--out {tmp}/a_folder: is a folder"),
    (["simulate", "--system", "pendulum", "--plot", "{tmp}/a_folder"], "--plot {tmp}/a_folder: is a folder"),
    # adapt
    (["adapt", "--checkpoint", "{tmp}/nowhere", "--system", "pendulum", "--shots", "5", "--steps", "1"],
     "no such run directory"),
    (["adapt", "--checkpoint", "{tmp}/garbage_run", "--system", "pendulum", "--shots", "5", "--steps", "1"],
     "garbage_run"),
    (["adapt", "--checkpoint", "{tmp}/run", "--system", "nosuch", "--shots", "5", "--steps", "1"], "nosuch"),
    (["adapt", "--checkpoint", "{tmp}/qh9_run", "--system", "pendulum", "--shots", "5", "--steps", "1"],
     "qh9_run/meta.pt not found; has `metaham meta-train --out {tmp}/qh9_run` run? (it holds a `metaham qh9 train` run"),
    # meta-train configs
    (["meta-train", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/r"], "missing.yaml"),
    (["meta-train", "--config", "{tmp}/bad.yaml", "--out", "{tmp}/r"], "bad.yaml, line 2, column 1: not valid YAML"),
    (["meta-train", "--config", "{tmp}/binary.yaml", "--out", "{tmp}/r"], "binary.yaml: not a text file"),
    (["meta-train", "--config", TINY_META, "--set", "nosuch.key=1", "--out", "{tmp}/r"], "unknown key 'nosuch'"),
    (["meta-train", "--config", TINY_META, "--set", "train.outer_steps=abc", "--out", "{tmp}/r"],
     "'train.outer_steps' must be int"),
    (["meta-train", "--config", TINY_META, "--set", "split=nosuch_split", "--out", "{tmp}/r"], "nosuch_split"),
    (["meta-train", "--config", TINY_META, "--set", "model.backbone=nosuch", "--out", "{tmp}/r"], "nosuch"),
    (["meta-train", "--config", TINY_META, "--out", "{tmp}/a_file"], "--out {tmp}/a_file: is a file; expected a folder"),
    (["meta-train", "--resume", "--out", "{tmp}/run_truncated"], "meta.pt: not a readable metaham checkpoint"),
    (["meta-train", "--resume", "--out", "{tmp}/run_malicious"], "meta.pt: refused"),
    # qh9
    (["qh9", "train", "--data", "{tmp}/not_a_db.db", "--out", "{tmp}/new_run"], "not_a_db.db: not a QH9 file"),
    (["qh9", "train", "--data", "{tmp}/two_rows.db", "--out", "{tmp}/new_run", "--set", "data.split_by=stable-id"],
     "the stable-id split leaves 1 training and 0 validation rows of 2; both must be non-empty (use more rows)"),
    (["qh9", "train", "--data", "{tmp}/two_rows.db", "--out", "{tmp}/new_run"],
     "the auto split (dynamic-geo here) leaves"),
    (["qh9", "info", "{tmp}/missing.db"], "missing.db: no such file"),
    (["qh9", "info", "{tmp}/not_a_db.db"], "not_a_db.db: not a QH9 file"),
    (["qh9", "baseline", "--data", "{tmp}/not_a_db.db"], "not_a_db.db: not a QH9 file"),
    (["qh9", "eval", "--checkpoint", "{tmp}/garbage_run"], "garbage_run"),
    (["qh9", "eval", "--checkpoint", "{tmp}/run"], "{tmp}/run: no best.pt or last.pt; it holds a `metaham meta-train` run"),
    (["qh9", "eval", "--checkpoint", "{tmp}/garbage_run", "--save-predictions", "{tmp}/a_file/p.npz"],
     "--save-predictions {tmp}/a_file/p.npz: {tmp}/a_file is a file"),
    (["adapt", "--checkpoint", "{tmp}/run", "--system", "pendulum", "--shots", "5", "--steps", "1",
      "--plot", "{tmp}/a_file/adapt.png"], "--plot {tmp}/a_file/adapt.png: {tmp}/a_file is a file"),
    (["demo", "--out", "{tmp}/a_file"], "--out {tmp}/a_file: is a file; expected a folder"),
    (["qh9", "generate", "--molecules", "NOSUCH", "--out", "{tmp}/g.db"], "'NOSUCH'"),
    (["qh9", "generate", "--molecules", "{tmp}/no_atoms.xyz", "--out", "{tmp}/g.db"], "no_atoms.xyz: no atoms"),
    (["qh9", "generate", "--molecules", "{tmp}/coincident.xyz", "--out", "{tmp}/g.db"], "coincident atoms"),
    (["qh9", "generate", "--molecules", "{tmp}/nan.xyz", "--out", "{tmp}/g.db"], "atom 1 has a non-finite coordinate"),
    (["qh9", "generate", "--molecules", "H2O", "--out", "{tmp}/a_file/g.db"], "a_file is a file, not a folder"),
    (["qh9", "generate", "--molecules", "H2O", "--max-orbitals", "20", "--out", "{tmp}/g.db"],
     "24 atomic orbitals (3 atoms) is more than max_orbitals 20"),
    (["qh9", "info", "{tmp}/nan_H.db"], "nan_H.db: row 2: Ham holds a non-finite value (NaN or inf) at entry 3"),
    (["qh9", "info", "{tmp}/short_H.db"], "short_H.db: row 1: Ham has 100 bytes"),
    (["qh9", "baseline", "--data", "{tmp}/nan_H.db", "--split", "all"], "row 2: Ham holds a non-finite"),
    # bench, cache, config, demo
    (["bench", "maml", "--system", "nosuch"], "unknown system 'nosuch'"),
    (["bench", "maml", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench", "maml", "--backbone", "nosuch", "--repeats", "1"], "unknown backbone 'nosuch'"),
    (["cache", "--dir", "{tmp}/a_file"], "--dir {tmp}/a_file: is a file"),
    (["cache", "--dir", "{tmp}/nowhere"], "--dir {tmp}/nowhere: no such folder"),
    (["cache", "--clear", "--system", "nosuch"], "--system nosuch: no such system"),
    (["config", "show", "nosuch"], "no shipped config named 'nosuch'"),
    (["config", "show"], "show needs a NAME"),
    (["config", "list", "extra"], "list takes no name"),
    (["demo", "--only", "nosuch"], "unknown part(s) nosuch"),
]


def _pendulum_plugin(path: Path, cls: str, name: str, decorator: str, after: str = "") -> Path:
    """A plugin file registering a pendulum subclass ``cls`` as ``name`` (line 5 holds the decorator)."""
    path.write_text(f"import systems\nfrom systems.pendulum import Pendulum\n\n\n{decorator}\n"
                    f"class {cls}(Pendulum):\n    name = {name!r}\n{after}")
    return path


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> Path:
    """A folder of broken inputs, and a tiny meta-train run for the commands that need one."""
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "raises.py").write_text("import systems\nraise RuntimeError('boom')\n")
    (tmp / "syntax.py").write_text("def broken(:\n")
    (tmp / "empty.py").write_text("import systems\nx = 1\n")
    _pendulum_plugin(tmp / "duplicate.py", "Mine", "pendulum", "@systems.register")
    nan_field = _DUFFING.replace('name = "duffing"', 'name = "nan_duffing"').replace(
        "return surplus_pad(px / m), surplus_pad(-alpha * x - beta * x**3)", NAN_VECTOR_FIELD)
    assert NAN_VECTOR_FIELD in nan_field and "nan_duffing" in nan_field  # the example still has that shape
    (tmp / "nan.py").write_text(nan_field)
    assert FIELD_RAISES.count("field boom") == 1  # the example still has that shape
    (tmp / "field_raises.py").write_text(FIELD_RAISES)
    (tmp / "bad.yaml").write_text("split: [\n")
    (tmp / "no_atoms.xyz").write_text("0\n\n")
    (tmp / "coincident.xyz").write_text("2\n\nH 0 0 0\nH 0 0 0.01\n")
    (tmp / "nan.xyz").write_text("2\n\nH 0 0 0\nH nan 0 0.7\n")
    (tmp / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp / "not_a_db.db").write_text("not a database")
    (tmp / "a_file").write_text("a regular file")
    (tmp / "a_folder").mkdir()
    (tmp / "garbage_run").mkdir()
    for name in ("meta.pt", "last.pt", "best.pt", "config.yaml"):
        (tmp / "garbage_run" / name).write_bytes(os.urandom(256))
    (tmp / "qh9_run").mkdir()  # what the meta commands see of a `qh9 train` run: its checkpoint names
    for name in ("last.pt", "config.yaml"):
        (tmp / "qh9_run" / name).write_bytes(os.urandom(256))
    _damaged_qh9_files(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAHAM_CACHE", str(tmp / "cache"))
        assert main(["meta-train", "--config", TINY_META, "--out", str(tmp / "run"), "--no-progress",
                     "--set", "train.outer_steps=1", "--set", "train.validate_every=0"]) == 0
    _damaged_checkpoints(tmp)
    return tmp


class _RunsCode:
    """Pickled, this makes the unpickler call ``os.system``: what a malicious checkpoint holds."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _damaged_checkpoints(tmp: Path) -> None:
    """Copies of the tiny run whose meta.pt is cut short, and one whose meta.pt would run code if unpickled."""
    import pickle
    import shutil

    for name in ("run_truncated", "run_malicious"):
        shutil.copytree(tmp / "run", tmp / name)
    good = (tmp / "run" / "meta.pt").read_bytes()
    (tmp / "run_truncated" / "meta.pt").write_bytes(good[: len(good) // 2])
    (tmp / "run_malicious" / "meta.pt").write_bytes(pickle.dumps({"model": _RunsCode()}))


def _damaged_qh9_files(tmp: Path) -> None:
    """``nan_H.db``: row 2's H holds a NaN; ``short_H.db``: row 1's H blob is cut to 100 bytes."""
    import shutil
    import sqlite3

    import numpy as np

    from metaham.qh9.generate import g2_molecules, generate

    generate(tmp / "h2.db", g2_molecules(["H2"]), conformers=2, displacement=0.05, progress=False, workers=1)
    for name, row in (("nan_H.db", 2), ("short_H.db", 1)):
        shutil.copy(tmp / "h2.db", tmp / name)
        with sqlite3.connect(tmp / name) as db:
            blob = db.execute("SELECT Ham FROM data WHERE id = ?", (row,)).fetchone()[0]
            if name == "nan_H.db":
                H = np.frombuffer(blob, dtype=np.float64).copy()
                H[3] = np.nan
                blob = H.tobytes()
            db.execute("UPDATE data SET Ham = ? WHERE id = ?", (blob[:100] if name == "short_H.db" else blob, row))
    (tmp / "h2.db").rename(tmp / "two_rows.db")  # intact, but too small to split


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if "cache" not in p.parts}


@pytest.mark.parametrize("argv, culprit", CASES, ids=[" ".join(c[0][:3]) + f" #{i}" for i, c in enumerate(CASES)])
def test_hostile_input_exits_2_with_one_line_naming_the_culprit(argv, culprit, hostile_files, capsys, monkeypatch):
    tmp = hostile_files
    monkeypatch.setenv("METAHAM_CACHE", str(tmp / "cache"))
    # Plugins register into a copy of the registry: no case leaks a system into the next.
    monkeypatch.setattr(systems, "_REGISTRY", dict(systems._REGISTRY))
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    before = _listing(tmp)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    # Progress bars (tqdm, on stderr like the error) are not messages: "desc:  0%|...".
    lines = [line for line in err.strip().replace("\r", "\n").splitlines() if line and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1 and "error" in lines[0], err
    assert culprit.replace("{tmp}", str(tmp)) in lines[0], err
    assert "Traceback" not in err
    assert _listing(tmp) == before, "a refused command wrote or changed files"


def test_debug_shows_the_traceback_of_a_user_error(hostile_files, capsys, monkeypatch):
    monkeypatch.setattr(systems, "_REGISTRY", dict(systems._REGISTRY))
    with pytest.raises(PluginError, match="boom"):
        main(["--debug", "simulate", "--system", "pendulum", "--plugin", str(hostile_files / "raises.py")])


def test_a_plugin_may_replace_a_built_in_when_it_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(systems, "_REGISTRY", dict(systems._REGISTRY))
    plugin = _pendulum_plugin(tmp_path / "override.py", "Mine", "pendulum", "@systems.register(override=True)")
    assert systems.load_plugin(plugin) == ["pendulum"]
    assert type(systems.get("pendulum")).__name__ == "Mine"
    assert systems.load_plugin(plugin) == ["pendulum"]  # loading the same file again is not a clash


def test_a_failed_plugin_leaves_the_registry_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setattr(systems, "_REGISTRY", dict(systems._REGISTRY))
    plugin = _pendulum_plugin(tmp_path / "half.py", "Half", "half_registered", "@systems.register",
                              after="\n\nraise ValueError('fails after registering')\n")
    before = systems.names()
    with pytest.raises(PluginError, match="half.py, line 10: ValueError: fails after registering"):
        systems.load_plugin(plugin)
    assert systems.names() == before


def test_compile_without_a_cpp_compiler_is_one_line_naming_the_flag(tmp_path):
    """``bench qh9 --compile`` (inductor) where no C++ compiler works: exit 2 and a line naming the flag and the
    way out, not torch's traceback. In a subprocess: inductor reads ``$CXX`` when it is imported."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    argv = [sys.executable, "-m", "metaham", "bench", "qh9", "--part", "train", "--train-molecules", "1",
            "--train-repeats", "1", "--compile", "--set", "model.layers=1",
            "--set", "model.node_irreps=8x0e+4x1o+4x2e+2x3o+2x4e"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("metaham bench: error: --compile inductor: torch.compile failed")
    assert "no-such-g++" in last and "--compile aot_eager" in last


def test_an_unknown_malloc_setting_is_one_line_naming_the_variable(capsys, monkeypatch):
    """``METAHAM_MALLOC=off`` is not a value the allocator set-up knows: exit 2 and a line naming the variable
    and the values it takes, before any work; ``default`` and ``tuned`` run."""
    monkeypatch.setenv("METAHAM_MALLOC", "off")
    assert main(["systems", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "metaham systems: error: METAHAM_MALLOC='off': expected 'default' (glibc's own malloc thresholds) or 'tuned'"
    for value in ("default", "tuned", ""):
        monkeypatch.setenv("METAHAM_MALLOC", value)
        assert main(["systems", "--json"]) == 0
    capsys.readouterr()
