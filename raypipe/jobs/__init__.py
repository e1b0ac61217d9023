"""The jobs behind the ``raypipe`` command (and the scripts in a checkout's ``jobs/``).

Each module's ``main(argv)`` parses its arguments, runs the job and returns the exit
status; :func:`guarded` is the one place raypipe's errors become exit statuses, and
:func:`start_ray` the one place a job starts (or joins) Ray. Library functions below the
jobs use the Ray that is running.

Exit status: 0 done; 75 (EX_TEMPFAIL) the run stopped cleanly and continues when run
again; 1 the run ended short for another reason (the job says why); 2 a user error (bad
config, missing file, unreachable endpoint, ...).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from raypipe.errors import EXIT_RESUMABLE, RaypipeError, ResumableStop
from raypipe.placement import start_ray

#: command -> (module in raypipe.jobs, one line for ``raypipe --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "make an image-dialogue dataset (StableLLaVA method) into OUT"),
    "train": ("train", "tune LLaVA on raypipe Parquet (Ray Train + FSDP2)"),
    "evaluate": ("evaluate", "per-ability benchmarks: run, build, import, predict, score"),
    "export-llava": ("export_llava", "export a dataset to LLaVA's llava.json + images/"),
    "curate": ("curate", "curate in-context SD prompt examples per ability"),
}


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """``main`` with raypipe's errors turned into messages and exit statuses."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except ResumableStop as e:
            print(f"raypipe: stopped: {e}", file=sys.stderr)
            return EXIT_RESUMABLE
        except RaypipeError as e:
            print(f"raypipe: error: {e}", file=sys.stderr)
            return 2

    return run


def script(command: str) -> int:
    """What ``jobs/<script>.py`` in a checkout runs: the job's ``main`` on ``sys.argv``."""
    import importlib

    module = importlib.import_module(f"raypipe.jobs.{COMMANDS[command][0]}")
    return module.main(sys.argv[1:])


__all__ = ["COMMANDS", "guarded", "script", "start_ray"]
