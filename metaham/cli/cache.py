"""``metaham cache``: what the task-pool cache holds, and clearing it.

Meta-training simulates each system's pool of trajectories once and keeps it under ``$METAHAM_CACHE/tasks``
(default ``~/.cache/metaham/tasks``); at the default scale that is about 1 GB for all seven systems. Nothing
prunes it automatically, because a later run with the same configuration reuses it; this command shows it and
frees the space. Deleting is always safe: a missing pool is simulated again.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from metaham.errors import UsageError
from metaham.text import table

from ._common import add_json_flag, emit

HELP = "show the task-pool cache (files and sizes per system) or clear it"
EXAMPLES = """
  metaham cache                          files and sizes per system under ~/.cache/metaham/tasks
  metaham cache --clear                  delete every cached pool (they are re-simulated when needed)
  metaham cache --clear --system pendulum three_body
  metaham cache --dir /scratch/tasks --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", metavar="DIR", help="cache folder (default: $METAHAM_CACHE/tasks or ~/.cache/metaham/tasks)")
    parser.add_argument("--system", nargs="+", metavar="NAME", help="only these systems' pools")
    parser.add_argument("--clear", action="store_true", help="delete the (selected) cached pools")
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from tasks.cache import cache_files, default_cache_dir, file_system

    cache_dir = Path(args.dir) if args.dir else default_cache_dir()
    if args.dir and not cache_dir.is_dir():
        raise UsageError(f"--dir {cache_dir}: {'is a file' if cache_dir.exists() else 'no such folder'}")
    files = cache_files(cache_dir, args.system)
    _check_system_names(args.system, cache_files(cache_dir))
    per_system: dict[str, dict[str, int]] = {}
    for f in files:
        entry = per_system.setdefault(file_system(f), {"files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += f.stat().st_size
    total = sum(e["bytes"] for e in per_system.values())
    if args.clear:
        for f in files:
            f.unlink(missing_ok=True)  # another process may have removed it meanwhile
    rows = [[name, e["files"], f"{e['bytes'] / 2**20:.1f}"] for name, e in sorted(per_system.items())]
    verb = "deleted" if args.clear else "holds"
    summary = f"{cache_dir}: {verb} {len(files)} pool file(s), {total / 2**20:.1f} MiB"
    if rows:
        summary += "\n" + table(rows, ["system", "files", "MiB"])
    if not args.clear and files:
        summary += "\n\n`metaham cache --clear` frees the space; pools are simulated again when a run needs them."
    result = {"cache_dir": str(cache_dir), "files": len(files), "bytes": total, "cleared": args.clear, "systems": per_system}
    return emit(args, summary, result)


def _check_system_names(names: list[str] | None, files: list[Path]) -> None:
    """A ``--system`` name must be a registered system or have pools in the cache (a plugin's, say)."""
    import systems
    from tasks.cache import file_system

    known = set(systems.names()) | {file_system(f) for f in files}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise UsageError(f"--system {' '.join(unknown)}: no such system and no pools of it in the cache; "
                         f"known systems: {', '.join(sorted(known))}")
