"""The ``raypipe`` command: one entry point for the jobs in :mod:`raypipe.jobs`.

    raypipe generate --config demo --out out/demo
    raypipe train --config tiny --data out/demo/data --out out/train-tiny
    raypipe evaluate score --predictions PRED/predictions.parquet --out REPORT
    raypipe export-llava --data out/demo/data --out out/demo-llava
    raypipe curate --abilities color --out my_abilities

Each command runs the ``main(argv)`` of its job module (the same code that
``ray job submit -- raypipe generate ...`` or, in a checkout,
``ray job submit -- python jobs/generate.py ...`` runs on a cluster), so they take the
same arguments and give the same exit status. ``raypipe COMMAND --help`` shows a
command's arguments; ``--config`` takes a preset name (listed by ``--help``) or a path.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from raypipe.jobs import COMMANDS
from raypipe.jobs.help import HelpParser, config_reference, generate_epilog

__all__ = ["COMMANDS", "HelpParser", "config_reference", "generate_epilog", "main", "usage"]


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: raypipe COMMAND [ARGS...]",
        "",
        "Synthesize visual-instruction data with Ray (StableLLaVA method) and tune LLaVA on it.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()),
        "",
        "`raypipe COMMAND --help` shows a command's arguments (`raypipe generate --help`:",
        "also the presets, abilities and config fields). On a cluster:",
        "`ray job submit -- raypipe COMMAND ...`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"raypipe {version('raypipe')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" Did you mean `raypipe {close[0]}`?" if close else ""
        print(
            f"raypipe: unknown command {command!r}.{hint} Commands: {', '.join(COMMANDS)}.",
            file=sys.stderr,
        )
        return 2
    job = importlib.import_module(f"raypipe.jobs.{COMMANDS[command][0]}")
    # argparse names the program after sys.argv[0]: `raypipe generate`, not `raypipe`.
    saved, sys.argv = sys.argv, [f"raypipe {command}", *rest]
    try:
        return job.main(rest)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
