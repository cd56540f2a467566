"""`python -m kdjax.methods`: every registered recipe, its one-line description and its stages."""

from __future__ import annotations

import sys

from kdjax.methods.base import get_method, known_methods


def describe() -> str:
    lines = []
    for name, description in known_methods().items():
        try:
            stages = " -> ".join(s.name for s in get_method(name).stages)
        except Exception as e:  # noqa: BLE001 -- a recipe that needs arguments is listed without stages
            stages = f"(needs arguments: {e})"
        lines.append(f"{name:<22} {description}\n{'':<22} stages: {stages}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
    sys.exit(0)
