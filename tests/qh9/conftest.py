"""A tiny QH9-style file generated once per session with QH9's real pyscf settings (water and H2)."""
import pytest

from metaham.qh9 import generate as gen


@pytest.fixture(scope="session")
def generated(tmp_path_factory):
    """``(path, computed)``: the file, and every ``(name, conformer) -> (Z, pos, SCFResult)`` pyscf returned."""
    computed = {}
    real = gen._compute

    def recording(job):
        out = real(job)
        name, k, Z, pos, result = out
        computed[(name, k)] = (Z, pos, result)
        return out

    path = tmp_path_factory.mktemp("qh9") / "small.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "_compute", recording)  # observe what pyscf produced; the run itself is real
        stats = gen.generate(path, gen.g2_molecules(["H2O", "H2"]), conformers=2, displacement=0.05, progress=False)
    assert stats["computed"] == 4 and stats["failed"] == 0
    return path, computed
