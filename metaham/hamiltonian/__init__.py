"""Learned Hamiltonians of particle systems: :class:`HamiltonianGNN`, its backbones and particle graphs.

>>> from metaham.hamiltonian import HamiltonianGNN, system_edge_index
"""
from .backbones import backbone_names, register_backbone
from .graph import edge_index, system_edge_index
from .model import HamiltonianGNN

__all__ = ["HamiltonianGNN", "backbone_names", "edge_index", "register_backbone", "system_edge_index"]
