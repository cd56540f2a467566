"""The shared shape of kdjax's small command-line tools (`kdjax.evaluate`, `kdjax.benchmark_latency`).

Each tool owns an absl `FlagValues` and a `run(flag_values) -> result`; `run_cli` parses the flags,
answers `--help`, keeps stdout for the tool's own report (libraries print while loading data and
weights), and turns bad input into one line on stderr with a distinct exit status.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

__all__ = ["run_cli"]


def run_cli(argv: Optional[Sequence[str]], flag_values: Any, usage: str,
            run: Callable[[Any], Any]) -> tuple[int, Optional[Any]]:
    """``(exit status, result)``: 0 with the result, 0 with None after ``--help``, 1 for bad input or a
    failed load (ValueError, KeyError, OSError), 2 for bad flags."""
    from absl import flags

    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(usage + "\n")
        print(flag_values.get_help())
        return 0, None
    try:
        extra = flag_values(argv)
    except flags.Error as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2, None
    if len(extra) > 1:
        print(f"error: unexpected positional arguments {extra[1:]}; every option is a --flag", file=sys.stderr)
        return 2, None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return 0, run(flag_values)
    except (ValueError, KeyError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1, None
