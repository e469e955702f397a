"""The JSON Schema of import/export files shipped in the package is the one the entity models generate."""

from __future__ import annotations

from importlib import resources

from scheduler_daemon.transfer.schema import FileDocument, FileWorld, render_schema

REGENERATE = (
    ".venv/bin/python -c 'from scheduler_daemon.transfer.schema import render_schema; "
    'print(render_schema(), end="")\' > scheduler_daemon/schemas/import.schema.json'
)


def test_the_shipped_schema_is_what_the_models_generate() -> None:
    shipped = resources.files("scheduler_daemon").joinpath("schemas", "import.schema.json").read_text(encoding="utf-8")
    assert shipped == render_schema(), f"the models changed: regenerate the schema file with\n  {REGENERATE}"


def test_the_schema_describes_the_document_and_its_world_lines() -> None:
    # pydantic's own view of the same models: the document holds worlds, an NDJSON line is $defs/FileWorld.
    schema = FileDocument.model_json_schema(by_alias=True)
    assert schema["required"] == ["worlds"]
    assert schema["properties"]["worlds"]["items"] == {"$ref": "#/$defs/FileWorld"}
    world = schema["$defs"]["FileWorld"]
    assert set(world["properties"]) == set(FileWorld.model_json_schema(by_alias=True)["properties"])
    assert set(world["properties"]) >= {"externalId", "name", "simulation", "meta", "worldTime", "npcs", "sessions"}
    assert world["properties"]["npcs"]["items"] == {"$ref": "#/$defs/Npc"}
    assert world["properties"]["sessions"]["items"] == {"$ref": "#/$defs/Session"}
    assert world["additionalProperties"] is False
