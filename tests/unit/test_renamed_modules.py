"""Modules renamed so one feature has one word stay importable under their old names, with a warning."""

from __future__ import annotations

import importlib
import sys

import pytest

from scheduler_daemon import chains, generation


@pytest.mark.parametrize(("old", "new"), [("jobs", generation), ("interactions", chains)])
def test_the_old_module_name_warns_and_is_the_renamed_module(
    old: str, new: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"scheduler_daemon.{old}"
    monkeypatch.delitem(sys.modules, name, raising=False)  # import it afresh, so it warns again
    with pytest.warns(DeprecationWarning, match=f"{name} is now scheduler_daemon"):
        module = importlib.import_module(name)
    assert module is new
    assert sys.modules[name] is new


def test_names_game_code_imported_from_the_old_modules_still_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "scheduler_daemon.interactions", raising=False)
    with pytest.warns(DeprecationWarning):
        from scheduler_daemon.interactions import start_chain
    assert start_chain is chains.start_chain
