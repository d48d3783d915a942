"""pyproject.toml says what the package is: every package of the tree is installed, every dependency is used."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = (ROOT / "pyproject.toml").read_text()
# Distribution name -> the module it is imported as, where the two differ.
IMPORT_NAMES = {"torch-geometric": "torch_geometric", "pyyaml": "yaml"}


def _toml_list(key: str) -> list[str]:
    """The strings of a top-level ``key = [...]`` list (a regex: tomllib is not in Python 3.10)."""
    match = re.search(rf"^{key} = \[(.*?)\]", PYPROJECT, flags=re.S | re.M)
    assert match, f"pyproject.toml has no {key} list"
    return re.findall(r'"([^"]+)"', match.group(1))


def test_every_package_in_the_tree_is_installed():
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("metaham", "systems", "tasks")
             for p in (ROOT / top).rglob("__init__.py")}
    # The repository's configs/ folder and its splits/ (data only), mapped by [tool.setuptools.package-dir].
    found |= {"metaham.configs", "metaham.configs.splits"}
    assert set(_toml_list("packages")) == found


def test_every_declared_dependency_is_imported_by_the_package():
    sources = "\n".join(p.read_text() for top in ("metaham", "systems", "tasks") for p in (ROOT / top).rglob("*.py"))
    for requirement in _toml_list("dependencies"):
        dist = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()
        module = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
        pattern = rf"^\s*(import|from) {re.escape(module)}\b"
        assert re.search(pattern, sources, flags=re.M), f"{dist} is declared in pyproject.toml but never imported"
