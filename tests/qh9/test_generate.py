"""The pyscf generator: resume after an interruption, failed SCFs, parallel workers, refused inputs."""
import numpy as np
import pytest

from metaham.qh9 import generate as gen
from metaham.qh9.basis import UnsupportedError
from metaham.qh9.formats import open_qh9


def test_g2_selection_is_closed_shell_hcnof():
    molecules = gen.g2_molecules()
    assert len(molecules) == 73
    for m in molecules:
        assert set(m.Z.tolist()) <= {1, 6, 7, 8, 9} and int(m.Z.sum()) % 2 == 0 and len(m.Z) > 1
    names = {m.name for m in molecules}
    assert {"H2O", "CH4", "C6H6"} <= names and "O2" not in names and "CH3" not in names  # triplet, radical
    with pytest.raises(ValueError, match="'O2' is open-shell"):
        gen.g2_molecules(["O2"])


def test_conformers_are_deterministic_and_displaced():
    (water,) = gen.g2_molecules(["H2O"])
    np.testing.assert_array_equal(gen.conformer(water, 0, 0.1, seed=0), water.pos)
    a, b = gen.conformer(water, 1, 0.1, seed=0), gen.conformer(water, 1, 0.1, seed=0)
    np.testing.assert_array_equal(a, b)
    assert 0.01 < np.std(a - water.pos) < 0.3
    assert not np.array_equal(a, gen.conformer(water, 2, 0.1, seed=0))
    assert not np.array_equal(a, gen.conformer(water, 1, 0.1, seed=1))


def test_interrupted_run_leaves_a_valid_file_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "h2.db"
    molecules = gen.g2_molecules(["H2"])
    real, calls = gen._compute, []

    def interrupted(job):
        calls.append(job[:2])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second geometry
        return real(job)

    monkeypatch.setattr(gen, "_compute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(out, molecules, conformers=3, progress=False)
    with open_qh9(out) as f:
        assert len(f) == 1
        first = f[0]
    monkeypatch.setattr(gen, "_compute", real)
    stats = gen.generate(out, molecules, conformers=3, progress=False)
    assert (stats["existing"], stats["computed"], stats["failed"]) == (1, 2, 0)
    with open_qh9(out) as f:
        assert [(r.molecule, r.geometry) for r in f] == [("H2", 0), ("H2", 1), ("H2", 2)]
        assert f[0].H.tobytes() == first.H.tobytes()  # the committed row is untouched
    assert gen.generate(out, molecules, conformers=3, progress=False)["computed"] == 0


def test_unconverged_scf_is_recorded_and_skipped(tmp_path):
    out = tmp_path / "failed.db"
    settings = gen.DFTSettings(max_cycle=1)
    stats = gen.generate(out, gen.g2_molecules(["H2"]), settings=settings, progress=False)
    assert (stats["computed"], stats["failed"]) == (0, 1)
    with open_qh9(out) as f:
        assert len(f) == 0
        assert f.failed == [{"name": "H2", "conformer": 0, "reason": "SCF not converged after 1 cycles"}]
    assert gen.generate(out, gen.g2_molecules(["H2"]), settings=settings, progress=False)["existing"] == 1


def test_parallel_workers_match_the_serial_run(generated, tmp_path):
    path, _ = generated
    out = tmp_path / "parallel.db"
    stats = gen.generate(out, gen.g2_molecules(["H2"]), conformers=2, workers=2, progress=False)
    assert stats["computed"] == 2
    with open_qh9(path) as serial, open_qh9(out) as parallel:
        expected = [r for r in serial if r.molecule == "H2"]
        got = list(parallel)
    assert [(r.molecule, r.geometry) for r in got] == [("H2", 0), ("H2", 1)]  # ids follow job order
    for a, b in zip(got, expected):
        assert a.pos.tobytes() == b.pos.tobytes()
        np.testing.assert_allclose(a.H, b.H, rtol=0, atol=1e-10)


def _pyscf_threads(_job) -> int:
    from pyscf import lib

    return lib.num_threads()


def test_jobs_in_this_process_run_pyscf_on_one_thread_like_the_workers():
    """Several OpenMP threads sum in a varying order: the in-process path (one worker, or one job) must run pyscf
    on one thread as each worker does, and give the caller its own thread count back."""
    from pyscf import lib

    with lib.with_omp_threads(2):
        assert list(gen.pyscf_map(_pyscf_threads, [0, 1], workers=1)) == [1, 1]
        assert list(gen.pyscf_map(_pyscf_threads, [0], workers=4)) == [1]
        assert lib.num_threads() == 2


def test_refused_inputs(generated, tmp_path):
    path, _ = generated
    with pytest.raises(ValueError, match="displacement_angstrom=0.05, this run asks for 0.1"):
        gen.generate(path, gen.g2_molecules(["H2"]), displacement=0.1, progress=False)
    h2 = gen.g2_molecules(["H2"])
    with pytest.raises(ValueError, match="xc 'nonsense'"):
        gen.generate(tmp_path / "x.db", h2, settings=gen.DFTSettings(xc="nonsense"), progress=False)
    with pytest.raises(UnsupportedError, match="basis '6-31g'"):
        gen.generate(tmp_path / "x.db", h2, settings=gen.DFTSettings(basis="6-31g"), progress=False)
    xyz = tmp_path / "h2s.xyz"
    xyz.write_text("3\nhydrogen sulfide\nS 0 0 0\nH 0 0 1.34\nH 1.34 0 0\n")
    with pytest.raises(UnsupportedError, match=r"h2s\.xyz: element S \(Z=16\)"):
        gen.read_xyz(xyz)
    radical = tmp_path / "oh.xyz"
    radical.write_text("2\n\nO 0 0 0\nH 0 0 0.97\n")
    with pytest.raises(UnsupportedError, match="oh.xyz: odd number of electrons"):
        gen.read_xyz(radical)
    foreign = tmp_path / "foreign.db"
    foreign.write_text("not a database")
    with pytest.raises(ValueError, match="foreign.db: exists and is not an SQLite database"):
        gen.generate(foreign, gen.g2_molecules(["H2"]), progress=False)
