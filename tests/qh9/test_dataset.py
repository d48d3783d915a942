"""The PyG data path: QH9 rows as ``Data``, batched by PyG's own loader, matrices back exactly; user molecules."""
import numpy as np
import pytest
import torch
from ase.build import molecule
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from metaham.qh9.basis import n_orbitals
from metaham.qh9.dataset import QH9Dataset, matrices, molecule_data
from metaham.qh9.formats import open_qh9
from metaham.qh9.model import QH9Model
from metaham.qh9.data import with_initial_guess

TINY = dict(node_irreps="8x0e+4x1o+4x2e", layers=1, lmax_sh=2, radial_hidden=8, pair_channels=4, head_mul=2,
            head_hidden=8)


def _records(path):
    with open_qh9(path) as f:
        return list(f)


def test_an_item_is_a_pyg_data_with_flat_float64_matrices(generated):
    path, _ = generated
    record = _records(path)[1]
    data = QH9Dataset(path)[1]
    assert type(data) is Data
    assert set(data.keys()) == {"z", "pos", "H", "H_init", "norb", "id", "molecule"}
    assert data.z.dtype == torch.long and data.z.tolist() == record.Z.tolist()
    assert data.pos.dtype == torch.float64 and data.pos.shape == (3, 3) and data.num_nodes == 3
    assert data.norb == 24 and data.H.shape == data.H_init.shape == (24 * 24,)
    assert data.H.dtype == data.H_init.dtype == torch.float64
    assert data.id == record.id and data.molecule == record.molecule == "H2O"
    (H,), (H_init,) = matrices(data, "H"), matrices(data, "H_init")
    assert H.numpy().tobytes() == record.H.tobytes() and H_init.numpy().tobytes() == record.H_init.tobytes()
    assert np.shares_memory(H.numpy(), data.H.numpy())  # views of the flat field, not copies


def test_dataset_keeps_its_indices_and_is_a_pyg_dataset(generated):
    path, _ = generated
    ids = [r.id for r in _records(path)]
    data = QH9Dataset(path, indices=[3, 1])
    assert len(data) == 2 and [d.id for d in data] == [ids[3], ids[1]]
    subset = data[1:]  # PyG's subsets share the open file
    assert len(subset) == 1 and subset[0].id == ids[1] and subset.file is data.file
    with pytest.raises(IndexError):
        data[2]
    with pytest.raises(IndexError, match="indices must lie in"):
        QH9Dataset(path, indices=[4])
    with pytest.raises(IndexError, match="indices must lie in"):
        QH9Dataset(path, indices=[-1])
    marked = QH9Dataset(path, transform=lambda d: d.update({"mark": 1}))
    assert marked[0].mark == 1


def test_pyg_dataloader_batches_molecules_of_different_sizes_and_matrices_round_trip(generated):
    path, _ = generated
    records = _records(path)[1:4]
    batch = next(iter(DataLoader(QH9Dataset(path, indices=[1, 2, 3]), batch_size=3)))
    assert isinstance(batch, Batch) and batch.num_graphs == 3
    assert batch.id.tolist() == [r.id for r in records] and batch.molecule == ["H2O", "H2", "H2"]
    assert batch.z.tolist() == [8, 1, 1, 1, 1, 1, 1] and batch.ptr.tolist() == [0, 3, 5, 7]
    assert batch.batch.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert batch.norb.tolist() == [24, 10, 10] and batch.H.shape == (24**2 + 2 * 10**2,)
    for key in ("H", "H_init"):
        got = matrices(batch, key)
        assert [tuple(h.shape) for h in got] == [(24, 24), (10, 10), (10, 10)]
        for h, r in zip(got, records):
            assert h.dtype == torch.float64 and h.numpy().tobytes() == getattr(r, key).tobytes()
    # PyG's own bookkeeping works: molecules come back out of the batch unchanged.
    again = batch.to_data_list()[0]
    assert torch.equal(again.z, batch.z[:3]) and matrices(again, "H")[0].numpy().tobytes() == records[0].H.tobytes()


def test_pyg_batching_equals_the_previous_collate_numerically(generated):
    """The batch holds what the former MoleculeBatch held, bit for bit: Z (int64), pos (float64), batch, ptr,
    and each molecule's H and H_init in pyscf order, in file order."""
    path, _ = generated
    records = _records(path)
    batch = Batch.from_data_list(list(QH9Dataset(path)))
    counts = torch.tensor([len(r.Z) for r in records])
    assert torch.equal(batch.z, torch.from_numpy(np.concatenate([r.Z for r in records]).astype(np.int64)))
    assert torch.equal(batch.pos, torch.from_numpy(np.concatenate([r.pos for r in records])))
    assert batch.pos.dtype == torch.float64 and batch.z.dtype == torch.long
    assert torch.equal(batch.batch, torch.repeat_interleave(torch.arange(len(records)), counts))
    assert torch.equal(batch.ptr, torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]))
    assert batch.id.tolist() == [r.id for r in records] and batch.molecule == [r.molecule for r in records]
    for key in ("H", "H_init"):
        assert [h.numpy().tobytes() for h in matrices(batch, key)] == [getattr(r, key).tobytes() for r in records]


def test_dataloader_workers_read_the_same_batches(generated):
    path, _ = generated
    data = QH9Dataset(path)
    serial = list(DataLoader(data, batch_size=2))
    parallel = list(DataLoader(data, batch_size=2, num_workers=2))  # each worker reopens the SQLite file
    for a, b in zip(serial, parallel, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("z", "pos", "H", "H_init", "id", "ptr"))


def test_a_molecule_built_by_the_user_goes_through_predict():
    """No file: molecules from ase, alone or batched by PyG, through a plain and a residual model."""
    atoms = [molecule("CH3OH"), molecule("H2O")]
    torch.manual_seed(0)
    model = QH9Model(**TINY, dense=True, residual=False).eval()
    single = molecule_data(atoms[0].numbers, atoms[0].positions)
    with torch.no_grad():
        (H,) = model.predict(single)
        batched = model.predict(Batch.from_data_list([molecule_data(a.numbers, a.positions) for a in atoms]))
    assert H.dtype == torch.float64 and H.shape == (48, 48) and torch.allclose(H, H.T)
    assert [tuple(h.shape) for h in batched] == [(48, 48), (24, 24)]
    assert torch.allclose(batched[0], H, rtol=0, atol=1e-6)  # float32 rounding: the molecules do not interact

    residual = QH9Model(**TINY, dense=True, residual=True).eval()
    with pytest.raises(ValueError, match="has no H_init"):
        residual.predict(single)
    n = n_orbitals(atoms[0].numbers)
    H_init = torch.eye(n, dtype=torch.float64)
    with torch.no_grad():
        (with_guess,) = residual.predict(molecule_data(atoms[0].numbers, atoms[0].positions, H_init=H_init))
        (learned,) = residual(single.z, single.pos, torch.zeros(6, dtype=torch.long), torch.tensor([0, 6]))
    assert torch.equal(with_guess, H_init + learned.double())


def test_molecule_data_checks_shapes():
    z, pos = [8, 1, 1], np.zeros((3, 3))
    with pytest.raises(ValueError, match="pos must have shape"):
        molecule_data(z, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="H must be a square matrix"):
        molecule_data(z, pos, H=np.zeros((24, 23)))
    with pytest.raises(ValueError, match="H_init must be a square matrix"):
        molecule_data(z, pos, H=np.zeros((24, 24)), H_init=np.zeros((10, 10)))
    with pytest.raises(ValueError, match="no 'norb' field"):
        matrices(Data(z=torch.tensor(z), pos=torch.zeros(3, 3), H=torch.zeros(24 * 24)))


def test_with_initial_guess_fills_h_init_as_a_dataset_transform(generated):
    """A file without H_init: pyscf's MINAO-guess Fock, computed as a row is read, cached by row id."""
    path, _ = generated
    record = _records(path)[0]
    cache = {}
    plain = QH9Dataset(path, transform=lambda d: with_initial_guess(d.update({"H_init": None}), cache))
    first = plain[0]
    assert list(cache) == [record.id] and first.H_init.shape == (record.norb**2,)
    # The same settings as the generator: the guess equals the one the file stores.
    assert np.allclose(matrices(first, "H_init")[0].numpy(), record.H_init, rtol=0, atol=1e-10)
    assert plain[0].H_init is cache[record.id]  # read again: from the cache, no second pyscf run
