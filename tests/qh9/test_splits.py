"""QH9's official splits: sizes as published, disjoint and complete, molecule groups kept whole."""
import random

import numpy as np
import pytest

from metaham.qh9.formats import Catalog
from metaham.qh9.splits import default_scheme, select, split


def _catalog(molecules, atoms=None, geometry=None):
    n = len(molecules)
    atoms = np.full(n, 3) if atoms is None else np.asarray(atoms)
    return Catalog(
        ids=np.arange(1, n + 1),
        Z=[np.ones(int(a), dtype=np.int64) for a in atoms] if n < 1000 else [np.ones(3, dtype=np.int64)] * n,
        molecule=np.array([str(m) for m in molecules], dtype=object),
        geometry=np.zeros(n, dtype=np.int64) if geometry is None else np.asarray(geometry),
    )


def _check_partition(parts, n):
    everything = np.concatenate(list(parts.values()))
    assert len(everything) == n and len(np.unique(everything)) == n


def test_stable_id_published_sizes():
    n = 130831  # QH9-stable
    parts = split(_catalog(range(n)), "stable-id")
    assert [len(parts[k]) for k in ("train", "val", "test")] == [104664, 13083, 13084]
    _check_partition(parts, n)
    order = np.random.RandomState(43).permutation(n)  # QH9's recipe
    np.testing.assert_array_equal(parts["test"], np.sort(order[104664 + 13083 :]))
    assert not np.array_equal(split(_catalog(range(n)), "stable-id", seed=0)["test"], parts["test"])


def test_stable_ood_by_size():
    atoms = [5, 20, 21, 22, 23, 29, 12]
    parts = split(_catalog(range(7), atoms=atoms), "stable-ood")
    assert parts["train"].tolist() == [0, 1, 6] and parts["val"].tolist() == [2, 3] and parts["test"].tolist() == [4, 5]


def _dynamic(n_mol=2998, per=100):
    return _catalog(np.repeat(np.arange(n_mol), per), geometry=np.tile(np.arange(per), n_mol))


def test_dynamic_published_sizes_and_groups():
    small = _dynamic(n_mol=50)  # per molecule 80/10/10: QH9-dynamic-300k's 2998 molecules give 239,840/29,980/29,980
    geo = split(small, "dynamic-geo")
    assert [len(geo[k]) for k in ("train", "val", "test")] == [4000, 500, 500]
    _check_partition(geo, len(small))
    for part in geo.values():
        assert np.all(np.bincount(small.molecule[part].astype(int)) == len(part) // 50)
    # every molecule contributes 80/10/10 of its geometries, permuted by RandomState(last row of the molecule)
    first = np.random.RandomState(99).permutation(100)
    np.testing.assert_array_equal(geo["test"][:10], np.sort(first[90:]))

    catalog = _dynamic()
    mol = split(catalog, "dynamic-mol")
    assert [len(mol[k]) for k in ("train", "val", "test")] == [239800, 29900, 30100]
    _check_partition(mol, len(catalog))
    molecules = {k: set(catalog.molecule[v]) for k, v in mol.items()}
    assert not molecules["train"] & molecules["test"] and not molecules["train"] & molecules["val"]
    ids = list(range(2998))
    random.seed(43)
    random.shuffle(ids)  # QH9's recipe
    assert molecules["test"] == {str(i) for i in ids[2398 + 299 :]}


def test_small_generated_set_and_default_scheme():
    catalog = _catalog(["H2O"] * 3 + ["CH4"] * 3, geometry=[0, 1, 2, 0, 1, 2])
    assert default_scheme(catalog) == "dynamic-geo"
    assert default_scheme(_catalog(range(5))) == "stable-id"
    parts = split(catalog, "dynamic-geo")
    assert [len(parts[k]) for k in ("train", "val", "test")] == [4, 0, 2]
    assert sorted(catalog.molecule[parts["test"]]) == ["CH4", "H2O"]  # one held-out conformer per molecule
    assert select(catalog, "all", "dynamic-geo").tolist() == list(range(6))
    with pytest.raises(ValueError, match="unknown split scheme 'random'"):
        split(catalog, "random")
    with pytest.raises(ValueError, match="unknown split part 'dev'"):
        select(catalog, "dev", "stable-id")
