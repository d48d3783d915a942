"""metaham's shipped configs: this folder is installed as the package ``metaham.configs``.

The YAML files here are the defaults that ``metaham meta-train``, ``metaham qh9 train`` and ``metaham demo``
read when no ``--config`` is given, and ``splits/`` holds the named meta-train/meta-test splits. Read and copy
them here, or from an installed metaham with ``metaham config list`` and ``metaham config show NAME > my.yaml``.
This file exists only so that the folder is a package whose data ``importlib.resources`` can find in every
kind of install (wheel or editable); it holds no code.
"""
