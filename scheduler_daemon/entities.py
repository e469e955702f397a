"""The game's entities on the wire: worlds, NPCs and sessions, one format for the ingest API and import/export files.

Pydantic models with camelCase keys (like :mod:`scheduler_daemon.http.wire`),
strict types (``"5"`` is not a number, ``true`` is not an id), NaN/Infinity
and values the databases cannot store refused, so a bad body is a 422 naming
its field. No I/O: the store takes and returns plain column dicts, and the
functions here translate between those and the wire.

**References.** A daemon id is a positive integer. A game's own id, the
external id, is 1 to 200 characters without ``/`` or control characters,
unique among worlds, and per world among its NPCs and among its sessions. In
a URL path, ``12`` is the daemon id and ``ext:<externalId>`` (percent-encoded)
the external id (:func:`parse_ref`); in a session's NPC lists, an integer is
the daemon id and a string the NPC's external id.

**Game fields and daemon fields.** The game writes an NPC's name, places,
routine, energy, mood and ``state``; the daemon writes its tier and decisions
(:data:`NPC_DAEMON_FIELDS`). The API refuses daemon fields in an NPC upsert
(:class:`NpcInput`); an import file accepts them (:class:`Npc`) so an export
round-trips.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.storable import storable_problems, text_problem

#: Largest daemon id of a world, NPC or session (the columns are 32-bit).
MAX_ID: Final = 2**31 - 1
#: Longest external id, name, place or user id (the columns are ``VARCHAR(200)``).
MAX_TEXT: Final = 200
#: Largest count the ``BIGINT`` columns hold (an NPC's ``decisions``).
MAX_COUNT: Final = 2**63 - 1
#: NPC references per session list (a scene is a few; tiers hold at most a few hundred).
MAX_SESSION_NPCS: Final = 1000
#: The path prefix of an external id: ``/api/v1/worlds/ext:my-world``.
EXTERNAL_PREFIX: Final = "ext:"

TierLabel = Literal["detailed", "active", "ambient", "dormant", "frozen"]


def _storable_text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _external_id(value: str) -> str:
    if "/" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain '/' or control characters")
    return _storable_text(value)


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    problems = storable_problems(value)
    if problems:
        raise ValueError("; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems))
    return value


Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_storable_text)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_TEXT), AfterValidator(_storable_text)]
ExternalId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TEXT, description="The game's own id (no '/')"),
    AfterValidator(_external_id),
]
DaemonId = Annotated[int, Field(ge=1, le=MAX_ID)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]


def _npc_ref(value: Any, handler: ValidatorFunctionWrapHandler) -> int | str:
    # One message per bad item, instead of one per member of the union.
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_ID:
            raise ValueError(f"an NPC id is 1 … {MAX_ID}")
        return value
    if isinstance(value, str):
        if not 1 <= len(value) <= MAX_TEXT:
            raise ValueError(f"an external id is 1 to {MAX_TEXT} characters")
        return _external_id(value)
    raise ValueError("expected an NPC id (integer) or its external id (string)")


#: An NPC reference in a session: the daemon id (integer) or the NPC's external id (string).
NpcRef = Annotated[DaemonId | Annotated[str, Field(min_length=1, max_length=MAX_TEXT)], WrapValidator(_npc_ref)]


class EntityModel(BaseModel):
    """camelCase keys, strict types, unknown keys refused, no NaN/Infinity."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, allow_inf_nan=False, extra="forbid", strict=True
    )


# ------------------------------------------------------------------ worlds
class WorldInput(EntityModel):
    """A world as the game creates it (``POST /api/v1/worlds``)."""

    external_id: ExternalId | None = None
    name: Name
    simulation: JsonObject | None = Field(
        default=None, description="The scheduler config (meta.simulation), validated like PUT …/scheduler/config"
    )
    meta: JsonObject = Field(default_factory=dict, description="The world's other meta keys (the game's own)")

    @model_validator(mode="after")
    def _simulation_has_its_own_field(self) -> WorldInput:
        if "simulation" in self.meta:
            raise ValueError("meta.simulation: send the scheduler config as the top-level field simulation")
        return self

    def full_meta(self) -> dict[str, Any]:
        """The ``worlds.meta`` column: ``meta`` plus ``simulation`` under its key."""
        return {**self.meta, **({"simulation": self.simulation} if self.simulation is not None else {})}


class WorldPatch(EntityModel):
    """``PATCH /api/v1/worlds/{world}``: only the fields sent change; ``meta`` and ``simulation`` merge.

    ``meta`` and ``simulation`` are JSON merge patches (RFC 7396: ``null``
    removes a key); ``externalId: null`` removes the external id.
    """

    external_id: ExternalId | None = None
    name: Name | None = None
    simulation: JsonObject | None = None
    meta: JsonObject | None = None

    @model_validator(mode="after")
    def _no_nulls_but_external_id(self) -> WorldPatch:
        nulls = [f for f in ("name", "simulation", "meta") if f in self.model_fields_set and getattr(self, f) is None]
        if nulls:
            raise ValueError(f"{', '.join(nulls)}: must not be null")
        if self.meta is not None and "simulation" in self.meta:
            raise ValueError("meta.simulation: send the scheduler config as the top-level field simulation")
        return self


class World(WorldInput):
    """A world as the API answers and export files hold it; the daemon's fields are read-only."""

    id: DaemonId | None = None
    config_version: int | None = Field(default=None, description="Read-only: bumped by every config change")
    world_time: float | None = Field(
        default=None, description="Committed world time, game seconds (read-only; an import sets it on creation)"
    )
    paused: bool | None = Field(default=None, description="Read-only: the effective pauseSimulation")


def world_wire(
    world_id: int,
    *,
    external_id: str | None,
    name: str,
    meta: Mapping[str, Any],
    config_version: int,
    world_time: float | None,
    paused: bool,
) -> dict[str, Any]:
    """A stored world as the API's :class:`World` (camelCase), built without validation (stored rows may be odd)."""
    return {
        "id": world_id,
        "externalId": external_id,
        "name": name,
        "simulation": meta.get("simulation"),
        "meta": {k: v for k, v in meta.items() if k != "simulation"},
        "configVersion": config_version,
        "worldTime": world_time,
        "paused": paused,
    }


# -------------------------------------------------------------------- NPCs
#: Fields only the daemon writes (read-only in the API, accepted on import): wire name -> column.
NPC_DAEMON_FIELDS: Final = {
    "tier": "tier",
    "currentActivity": "current_activity",
    "activityStartedAt": "activity_started_at",
    "nextDecisionAt": "next_decision_at",
    "lastDecisionAt": "last_decision_at",
    "decisions": "decisions",
}


class NpcInput(EntityModel):
    """One NPC of a bulk upsert (``PUT /api/v1/worlds/{world}/npcs``): the game's fields.

    Matched by ``externalId`` (inserted when new), else by ``id`` (which must
    exist). On an update only the fields sent change; ``state`` merges key by
    key at its top level (keys the daemon keeps there, such as ``cooldowns``,
    stay). On an insert, fields not sent take their defaults.
    """

    external_id: ExternalId | None = None
    id: DaemonId | None = Field(default=None, description="The daemon's id of an existing NPC")
    name: Name
    location: Text | None = None
    home: Text | None = None
    routine: Text | None = Field(default=None, description="Key of a routine in the world's behaviour content")
    energy: float = 100.0
    mood_valence: float = 0.0
    mood_arousal: float = 0.0
    state: JsonObject = Field(default_factory=dict, description="The NPC's free-form state (e.g. needs)")

    def columns(self) -> dict[str, Any]:
        """The ``npcs`` columns of the fields sent (``id`` and ``external_id`` included when sent)."""
        out: dict[str, Any] = {}
        for field in self.model_fields_set:
            value = getattr(self, field)
            out[field] = Tier.from_label(value).value if field == "tier" and value is not None else value
        return out


class Npc(NpcInput):
    """An NPC as the API answers and files hold it: the game's fields plus the daemon's.

    In a file (import) every field is accepted; in the API the daemon's fields are read-only.
    """

    tier: TierLabel | None = Field(default=None, description="Read-only: the tier the daemon assigned")
    current_activity: Text | None = None
    activity_started_at: float | None = Field(default=None, description="World time")
    next_decision_at: float = Field(default=0.0, description="World time of the NPC's next decision")
    last_decision_at: float | None = Field(default=None, description="World time of its last decision")
    decisions: int = Field(default=0, ge=0, le=MAX_COUNT, description="Decisions taken so far")
    problem: str | None = Field(
        default=None, description="Read-only: why the daemon cannot decide this NPC (quarantined), or null"
    )

    def columns(self) -> dict[str, Any]:
        """The ``npcs`` columns of the fields sent, daemon fields included (``problem`` is never written)."""
        out = super().columns()
        out.pop("problem", None)
        return out


#: ``npcs`` column -> wire key, for every column :func:`npc_wire` reads.
_NPC_WIRE_KEYS: Final = {
    "id": "id",
    "external_id": "externalId",
    "name": "name",
    "location": "location",
    "home": "home",
    "routine": "routine",
    "energy": "energy",
    "mood_valence": "moodValence",
    "mood_arousal": "moodArousal",
    "state": "state",
    "tier": "tier",
    "current_activity": "currentActivity",
    "activity_started_at": "activityStartedAt",
    "next_decision_at": "nextDecisionAt",
    "last_decision_at": "lastDecisionAt",
    "decisions": "decisions",
    "problem": "problem",
}


def npc_wire(columns: Mapping[str, Any]) -> dict[str, Any]:
    """A stored NPC (column dict, as the store reads it) in camelCase: the API's ``NpcState``, a file's :class:`Npc`."""
    tier = columns.get("tier")
    label = Tier(tier).label if isinstance(tier, int) and tier in {t.value for t in Tier} else None
    return {wire: label if column == "tier" else columns.get(column) for column, wire in _NPC_WIRE_KEYS.items()}


# ---------------------------------------------------------------- sessions
class SessionInput(EntityModel):
    """A session (a player online) as ``PUT /api/v1/worlds/{world}/sessions/{session}`` opens or updates it.

    Replaces the session's user, location and NPC lists; NPC references that
    do not exist in the world are refused, listed.
    """

    user_id: Name = Field(description="The player's id in the game")
    location: Text | None = Field(default=None, description="Where the player is (NPCs there become active)")
    scene_npc_ids: list[NpcRef] = Field(
        default_factory=list, max_length=MAX_SESSION_NPCS, description="NPCs in the player's scene (detailed)"
    )
    involved_npc_ids: list[NpcRef] = Field(
        default_factory=list, max_length=MAX_SESSION_NPCS, description="NPCs involved with the player (active)"
    )

    def columns(self) -> dict[str, Any]:
        """The ``sessions`` columns (NPC lists still references) for :meth:`Store.upsert_session`.

        Every field, sent or not: a session write replaces the session. ``id``
        and ``external_id`` only when sent.
        """
        out = self.model_dump(exclude={"id", "external_id"})
        out.update({k: getattr(self, k) for k in ("id", "external_id") if k in self.model_fields_set})
        return out


class Session(SessionInput):
    """A session as the API answers and files hold it (NPC lists as daemon ids in answers)."""

    external_id: ExternalId | None = None
    id: DaemonId | None = None
    active: bool = Field(default=True, description="False once closed (DELETE); the row stays")


def session_wire(columns: Mapping[str, Any]) -> dict[str, Any]:
    """A stored session (column dict) as the API's :class:`Session` (camelCase)."""
    return {
        "id": columns["id"],
        "externalId": columns.get("external_id"),
        "userId": columns["user_id"],
        "location": columns.get("location"),
        "sceneNpcIds": list(columns.get("scene_npc_ids") or []),
        "involvedNpcIds": list(columns.get("involved_npc_ids") or []),
        "active": bool(columns.get("active", True)),
    }


# -------------------------------------------------------------- references
def parse_ref(text: str) -> int | str:
    """A path segment as a reference: ``12`` is the daemon id 12, ``ext:abc`` the external id ``abc``.

    Raises :class:`ValueError` with a message for the client.
    """
    if text.startswith(EXTERNAL_PREFIX):
        external = text[len(EXTERNAL_PREFIX) :]
        if not 1 <= len(external) <= MAX_TEXT:
            raise ValueError(f"external id must be 1 to {MAX_TEXT} characters")
        return _external_id(external)
    if text.isascii() and text.isdigit() and not text.startswith("0") and int(text) <= MAX_ID:
        return int(text)
    raise ValueError(f"expected a daemon id (1 … {MAX_ID}) or {EXTERNAL_PREFIX}<externalId>")


def show_ref(ref: int | str) -> str:
    """A reference as a message shows it: ``12`` or ``ext:abc``."""
    return str(ref) if isinstance(ref, int) else f"{EXTERNAL_PREFIX}{ref}"
