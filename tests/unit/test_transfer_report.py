"""How an import reports rejected worlds and its summary (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from scheduler_daemon.transfer.report import ImportSummary, WorldCounts, WorldFailure, validation_problems
from scheduler_daemon.transfer.schema import FileWorld


def problems_of(data: object, index: int = 3) -> list[str]:
    with pytest.raises(ValidationError) as info:
        FileWorld.model_validate(data)
    return validation_problems(index, info.value)


def test_validation_problems_name_the_path_in_the_files_keys() -> None:
    npcs = [{"name": f"n{i}"} for i in range(12)] + [{"name": "x", "energy": "high", "moodValence": True}]
    assert problems_of({"name": "w", "npcs": npcs}) == [
        "worlds[3].npcs[12].energy: Input should be a valid number",
        "worlds[3].npcs[12].moodValence: Input should be a valid number",
    ]
    assert problems_of({"externalId": "a/b", "name": "w", "sessions": [{"userId": "u", "sceneNpcIds": [0]}]}) == [
        "worlds[3].externalId: must not contain '/' or control characters",
        "worlds[3].sessions[0].sceneNpcIds[0]: an NPC id is 1 … 2147483647",
    ]
    assert problems_of({"name": "w", "npcs": ["bob"], "worldsTime": 1}) == [
        "worlds[3].npcs[0]: Input should be a JSON object",
        "worlds[3].worldsTime: Extra inputs are not permitted",
    ]
    assert problems_of([1, 2], index=0) == ["worlds[0]: Input should be a JSON object"]


def test_a_world_with_many_problems_shows_twenty_and_counts_the_rest() -> None:
    failure = WorldFailure(7, 3, "w", [f"worlds[3].npcs[{i}].name: Field required" for i in range(25)])
    messages = failure.messages()
    assert len(messages) == 21
    assert messages[0] == "line 7: worlds[3].npcs[0].name: Field required"
    assert messages[-1] == "line 7: worlds[3]: … and 5 more problems"
    assert len(failure.to_wire()["problems"]) == 25


def test_summary_counts_and_renders() -> None:
    summary = ImportSummary(dry_run=True)
    summary.add(
        WorldCounts(True, npcs_created=3, npcs_updated=0, sessions_created=1, sessions_updated=0, sessions_closed=0)
    )
    summary.add(
        WorldCounts(False, npcs_created=1, npcs_updated=2, sessions_created=0, sessions_updated=1, sessions_closed=1)
    )
    summary.failures.append(WorldFailure(9, 2, None, ["worlds[2]: not valid JSON: Expecting value (column 1)"]))
    assert summary.progress_text() == "2 worlds, 6 NPCs, 1 failed"
    assert summary.render().splitlines() == [
        "dry run (every world rolled back, nothing committed):",
        "  worlds:   1 created, 1 updated, 1 failed",
        "  NPCs:     4 created, 2 updated",
        "  sessions: 1 created, 1 updated, 1 closed",
    ]
    wire = summary.to_wire()
    assert wire["worlds"] == {"created": 1, "updated": 1, "failed": 1}
    assert wire["failures"] == [
        {
            "line": 9,
            "index": 2,
            "externalId": None,
            "problems": ["worlds[2]: not valid JSON: Expecting value (column 1)"],
        }
    ]
