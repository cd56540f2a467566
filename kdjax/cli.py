"""The one shape of every kdjax command line (`kdjax.main`, `kdjax.evaluate`, `kdjax.benchmark_latency`).

Each tool owns an absl `FlagValues` and a `run(flag_values) -> result`; `run_cli` parses the flags
(with `--config=recipe.py[:arg]` and `--config.a.b=value` read by `kdjax.config` when the tool
takes a config), answers `--help`, and turns bad input into exactly one line on stderr:

* exit status 0: done;
* exit status 2: a user error -- a bad flag, config field, input file or workdir -- as
  ``<prog>: error: <what is wrong and what to do>``, with no traceback;
* exit status 130: interrupted (Ctrl-C);
* anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

__all__ = ["USER_ERRORS", "EXIT_INTERRUPTED", "EXIT_USER_ERROR", "is_user_error", "one_line", "run_cli"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

#: Exceptions whose message is meant for the user (matched by class name: their modules import jax).
USER_ERRORS = ("ConfigError", "ConfigFieldError", "InputError", "WorkdirError", "MethodError", "MatchingError",
               "CheckpointError", "NonFiniteLossError", "DatasetNotPreparedError", "TapError", "UnknownTaskError",
               "MeshError", "ShardingError", "DataError", "PlanError", "UsageError", "ProfileError")


def is_user_error(e: BaseException) -> bool:
    """A known user-facing error type, or a one-line ValueError/KeyError/OSError raised on bad input."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & set(USER_ERRORS):
        return True
    return isinstance(e, (ValueError, OSError)) and "\n" not in str(e).strip() and len(str(e)) < 2000


def one_line(e: BaseException) -> str:
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(message.split()) or type(e).__name__


def run_cli(argv: Optional[Sequence[str]], flag_values: Any, usage: str, run: Callable[[Any], Any], *,
            prog: str = "error", config: bool = False, quiet_stdout: bool = True) -> tuple[int, Optional[Any]]:
    """``(exit status, result)``; see the module docstring for the statuses.

    With `config=True`, `run(flag_values, spec, overrides)` gets the `--config` recipe and its
    `--config.a.b=value` overrides, to load with `kdjax.config.load`.
    `quiet_stdout` keeps stdout for the tool's own result (libraries print while loading data).
    """
    from absl import flags

    prefix = f"{prog}: error:" if prog != "error" else "error:"
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(usage + "\n")
        print(flag_values.get_help())
        return 0, None
    call = run
    try:
        if config:
            from kdjax import config as config_lib
            argv, spec, overrides = config_lib.split_config_args(argv)
            call = lambda fv: run(fv, spec, overrides)  # noqa: E731
        extra = flag_values(argv)
    except flags.Error as e:
        print(f"{prefix} {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_USER_ERROR, None
    except ValueError as e:
        print(f"{prefix} {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR, None
    if len(extra) > 1:
        print(f"{prefix} unexpected positional arguments {extra[1:]}; every option is a --flag", file=sys.stderr)
        return EXIT_USER_ERROR, None
    try:
        with contextlib.redirect_stdout(sys.stderr) if quiet_stdout else contextlib.nullcontext():
            return 0, call(flag_values)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except Exception as e:  # pylint: disable=broad-except
        if not is_user_error(e):
            raise
        print(f"{prefix} {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR, None
