"""Time the QH9 data path: batching molecules read from a QH9 file, as the training loop and the evaluator do.

Reads ``--file`` (any QH9 file, e.g. from ``metaham qh9 generate``), or else writes a QH9-layout SQLite file with
an ``H_init`` column (the layout of ``metaham qh9 generate``; the matrices are pyscf core Hamiltonians of displaced
conformers of the largest G2 molecules, QM9-sized: 96-114 AOs, see :func:`metaham.bench.qh9._inputs`), then
times, for each batch size (rows repeat where the file has fewer), the median over repeats of

* ``collate``: ``collate(items)`` on items already read (the batching alone);
* ``read+collate``: ``collate([dataset[i] for i in batch])`` (what one loader step does without workers).

``collate`` is ``torch_geometric.data.Batch.from_data_list`` (what PyG's ``DataLoader`` runs) for this tree's
PyG dataset. ``--against FILE`` also times another version of ``metaham/qh9/dataset.py`` -- one with
``QH9Dataset(path)`` and its own ``collate(items)`` (the versions before the PyG dataset) or PyG items -- in
alternation with this tree's, so that machine noise hits both alike; e.g. the committed one::

    git show HEAD:metaham/qh9/dataset.py > /tmp/dataset_head.py
    .venv/bin/python scripts/time_qh9_collate.py --against /tmp/dataset_head.py

One torch thread (the loader's batching runs in one process). Prints a table, and JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch_geometric.data import Batch

from metaham.bench import interleaved_median_times
from metaham.bench.qh9 import _inputs, _write_eval_file


def _load_version(path: Path):
    """``path`` imported as a module of the ``metaham.qh9`` package (its relative imports resolve there)."""
    spec = importlib.util.spec_from_file_location("metaham.qh9._timed_version", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--file", type=Path, default=None, help="a QH9 file to read instead of a written one")
    parser.add_argument("--molecules", type=int, default=8, help="distinct G2 molecules (default 8)")
    parser.add_argument("--conformers", type=int, default=8, help="geometries per molecule (default 8)")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per measurement (default 200)")
    parser.add_argument("--against", type=Path, default=None, help="another version of metaham/qh9/dataset.py")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from metaham.qh9 import dataset as current

    versions = {"this tree": current}
    if args.against is not None:
        versions = {str(args.against): _load_version(args.against), **versions}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file
        if path is None:
            path = Path(tmp) / "collate.db"
            _write_eval_file(path, _inputs(args.molecules, args.conformers))
        datasets = {name: module.QH9Dataset(path) for name, module in versions.items()}
        catalog = next(iter(datasets.values())).file.catalog()
        n, norb = len(catalog), catalog.n_orbitals
        fns = {}
        for size in args.batch_sizes:
            rows = [i % n for i in range(size)]
            for name, module in versions.items():
                dataset, collate = datasets[name], getattr(module, "collate", Batch.from_data_list)
                items = [dataset[i] for i in rows]
                fns[(name, size, "collate")] = lambda c=collate, x=items: c(x)
                fns[(name, size, "read+collate")] = lambda c=collate, d=dataset, r=rows: c([d[i] for i in r])
        times = interleaved_median_times(fns, repeats=args.repeats, warmup=3)
        for dataset in datasets.values():
            dataset.file.close()

    result = {"repeats": args.repeats, "rows": n, "norb": [int(norb.min()), int(norb.max())], "threads": 1,
              "median_ms": {}}
    print(f"median of {args.repeats}, ms per batch; {n} rows of {min(norb)}-{max(norb)} AOs, one torch thread")
    print(f"{'version':<40} {'batch':>5} {'collate':>10} {'read+collate':>13}")
    for size in args.batch_sizes:
        for name in versions:
            ms = {what: 1e3 * times[(name, size, what)] for what in ("collate", "read+collate")}
            result["median_ms"].setdefault(name, {})[str(size)] = ms
            print(f"{name:<40} {size:>5} {ms['collate']:>10.3f} {ms['read+collate']:>13.3f}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
