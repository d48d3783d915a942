"""metaham: learn Hamiltonians.

Two halves share one core of sparse SE(3)-equivariant layers:

* classical dynamics: physical systems (``systems``), a task distribution (``tasks``), a Hamiltonian graph
  network meta-trained with MAML that adapts to unseen systems in a few gradient steps;
* quantum chemistry: a head that predicts DFT Hamiltonian matrices (QH9, B3LYP/def2-SVP).

The command line (``metaham --help``) is the main entry point; the README is the front page and docs/ holds
one page per topic, each with its Python API.
"""
__version__ = "0.1.0"
