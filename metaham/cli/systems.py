"""``metaham systems``: every registered physical system, its particles, dimension and parameter ranges."""
from __future__ import annotations

import argparse
import inspect

from metaham.options import add_plugin_flag, get_system, load_plugins
from metaham.text import table

from ._common import add_json_flag, emit

HELP = "list the physical systems: particles, dimension, parameters with defaults and sampling ranges"
EXAMPLES = """
  metaham systems                        table of every system
  metaham systems pendulum               one system: its Hamiltonian, reference and initial-state sampler
  metaham systems --json                 the same as one JSON object
  metaham systems --plugin duffing.py    include the systems a plugin file registers
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one system in detail")
    add_plugin_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    import systems

    load_plugins(args.plugin)
    if args.name:
        system = get_system(args.name)
        module_doc = inspect.getdoc(inspect.getmodule(type(system))) or ""
        info = system.describe()
        summary = "\n".join([
            f"{info['name']}: {info['summary']}",
            f"particles {info['particles']}, dim {info['dim']}, dof {info['dof']}, separable {info['separable']}, "
            f"external field {info['external_field']}, edges {info['edges']}",
            "",
            table([[p["name"], p["default"], p["low"], p["high"], p["doc"]] for p in info["params"]],
                  ["parameter", "default", "low", "high", "meaning"]),
            "",
            module_doc,
        ])
        return emit(args, summary, {"systems": [info]})
    infos = [get_system(name).describe() for name in systems.names()]
    rows = [
        [
            i["name"], i["particles"], i["dim"], i["dof"], "yes" if i["separable"] else "no",
            "yes" if i["external_field"] else "no",
            " ".join(f"{p['name']}={p['default']:g}[{p['low']:g},{p['high']:g}]" for p in i["params"]),
        ]
        for i in infos
    ]
    header = ["system", "particles", "dim", "dof", "separable", "external", "parameters default[low,high]"]
    summary = table(rows, header)
    summary += "\n\n`metaham systems NAME` shows a system's Hamiltonian, reference and initial-state sampler."
    return emit(args, summary, {"systems": infos})
