"""``python tests/support/without_psycopg.py ARGS``: the ``scheduler-daemon`` command on an install without psycopg.

An import hook refuses ``psycopg`` as if the ``postgres`` extra were not installed
(the default install), then the command line runs as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class RefusePsycopg:
    """A meta path finder that says psycopg is not installed."""

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> ModuleSpec:
        if name == "psycopg" or name.startswith(("psycopg.", "psycopg_")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None  # type: ignore[return-value]  # the next finder decides


if __name__ == "__main__":
    sys.meta_path.insert(0, RefusePsycopg())
    from scheduler_daemon.cli import main

    raise SystemExit(main(sys.argv[1:]))
