"""The import/export file as a model, composed of the shared entities, and its JSON Schema shipped in the package.

The schema file (``scheduler_daemon/schemas/import.schema.json``) is
generated from these models; ``tests/unit/test_transfer_schema.py`` fails
when it is out of date and prints the command that regenerates it.
"""

from __future__ import annotations

import json
from typing import Any, Final

from pydantic import Field

from scheduler_daemon.entities import EntityModel, Npc, Session, World

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


class FileWorld(World):
    """One world of an import/export file: the world with its NPCs and sessions (one NDJSON line)."""

    npcs: list[Npc] = Field(default_factory=list, description="Upserted by externalId within the world")
    sessions: list[Session] = Field(default_factory=list, description="Upserted by externalId within the world")


class FileDocument(EntityModel):
    """A JSON import/export file: ``{"worlds": [...]}``. An NDJSON file holds one ``FileWorld`` per line."""

    worlds: list[FileWorld]


def generate_schema() -> dict[str, Any]:
    """The JSON Schema of a JSON file, as the models define it today (``$defs/FileWorld`` is an NDJSON line)."""
    schema = FileDocument.model_json_schema(by_alias=True)
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def render_schema() -> str:
    """:func:`generate_schema` as the text of the shipped file."""
    return json.dumps(generate_schema(), indent=2, ensure_ascii=False) + "\n"
