"""The compiled decide tables give exactly the decisions of the slot-by-slot reference (pure, no I/O)."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_daemon.demo import DEMO_BEHAVIOR
from scheduler_daemon.simulation.behavior import WEEKDAYS, active_slot, decide, parse_behavior, simulate_batch
from scheduler_daemon.simulation.npc import NpcState, Tier
from tests.support import reference_decide

PROPERTY = settings(database=None, deadline=None, max_examples=150)
NAMES = ("a", "b", "c", "d")

hhmm = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.sampled_from((0, 1, 15, 30, 59)))
slots = st.fixed_dictionaries(
    {
        "start": hhmm,
        "end": hhmm,
        "activities": st.dictionaries(st.sampled_from(NAMES), st.floats(0.1, 10), min_size=1, max_size=4),
    },
    optional={"days": st.sets(st.sampled_from(WEEKDAYS), min_size=1)},
).map(lambda s: {**s, "days": sorted(s["days"])} if "days" in s else s)
activities = st.fixed_dictionaries(
    {"durationMinutes": st.tuples(st.floats(1, 60), st.floats(0, 120)).map(lambda t: [t[0], t[0] + t[1]])},
    optional={
        "energyPerHour": st.floats(-20, 20),
        "moodValence": st.floats(-20, 20),
        "moodArousal": st.floats(-20, 20),
        "location": st.one_of(
            st.just("home"),
            st.sampled_from(("x", "y")),
            st.lists(st.sampled_from(("x", "home", "z")), min_size=1, max_size=3),
        ),
        "cooldownMinutes": st.floats(0, 300),
        "requirements": st.tuples(st.floats(0, 60), st.floats(0, 40)).map(
            lambda t: {"minEnergy": t[0], "maxEnergy": t[0] + t[1]}
        ),
    },
)
contents = st.builds(
    lambda acts, routines, default: {
        "activities": acts,
        "routines": {f"r{i}": {"slots": r} for i, r in enumerate(routines)},
        **({"defaultRoutine": "r0"} if default else {}),
    },
    st.fixed_dictionaries({name: activities for name in NAMES}),
    st.lists(st.lists(slots, max_size=6), min_size=1, max_size=3),
    st.booleans(),
)
# Around slot edges too: a day, an hour and minute slots use, a few seconds either side.
edges = st.builds(
    lambda week, day, h, m, s: week * 604_800.0 + day * 86_400.0 + h * 3_600.0 + m * 60.0 + s,
    st.integers(-2, 50),
    st.integers(0, 6),
    st.integers(0, 23),
    st.sampled_from((0, 1, 15, 30, 59)),
    st.sampled_from((0.0, -0.001, 0.5, 59.999, -30.0)),
)
world_times = st.one_of(st.floats(-1e6, 1e9, allow_nan=False), edges)


def _npc(data: Any) -> NpcState:
    started = data.draw(st.one_of(st.none(), st.floats(-1e6, 1e9, allow_nan=False)))
    cooldowns = data.draw(
        st.dictionaries(
            st.sampled_from((*NAMES, "gone")),
            st.one_of(st.floats(-1e6, 1e9), st.integers(-10, 10**6), st.booleans(), st.text(max_size=2)),
            max_size=4,
        )
    )
    return NpcState(
        id=data.draw(st.integers(1, 2**31 - 1)),
        world_id=data.draw(st.integers(1, 1000)),
        name="n",
        tier=data.draw(st.sampled_from(list(Tier)[:4])),
        next_decision_at=0.0,
        location=data.draw(st.one_of(st.none(), st.just("here"))),
        home=data.draw(st.one_of(st.none(), st.just("cottage"))),
        routine=data.draw(st.sampled_from((None, "r0", "r1", "r2", "unknown"))),
        current_activity=data.draw(st.sampled_from((None, "idle", *NAMES, "gone"))),
        activity_started_at=started,
        energy=data.draw(st.floats(0, 100)),
        mood_valence=data.draw(st.floats(-100, 100)),
        mood_arousal=data.draw(st.floats(-100, 100)),
        last_decision_at=data.draw(st.one_of(st.none(), st.floats(-1e6, 1e9, allow_nan=False))),
        state={"cooldowns": cooldowns, "other": [1]},
    )


def _same(a: Any, b: Any) -> bool:
    """Equal, and the same float bits (``-0.0`` is not ``0.0`` here)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1.0, a) == math.copysign(1.0, b) and (a == b or (math.isnan(a) and math.isnan(b)))
    return bool(a == b)


@PROPERTY
@given(contents, world_times, st.floats(0, 1e5), st.data())
def test_compiled_decide_equals_the_reference(raw: Any, world_time: float, interval: float, data: Any) -> None:
    content = parse_behavior(1, raw)
    npc = _npc(data)
    ours = decide(npc, content, world_time, interval)
    reference = reference_decide.decide(npc, content, world_time, interval)
    for field in NpcDecisionFields:
        assert _same(getattr(ours, field), getattr(reference, field)), field


@PROPERTY
@given(contents, world_times, st.lists(st.floats(0, 1e5), min_size=4, max_size=4), st.data())
def test_a_batch_decides_each_npc_as_decide_does(
    raw: Any, world_time: float, intervals: list[float], data: Any
) -> None:
    """simulate_batch with the built-in decide works out what its NPCs share once: the same decisions."""
    content = parse_behavior(1, raw)
    npcs = [_npc(data) for _ in range(data.draw(st.integers(1, 6)))]
    per_tier = dict(zip(list(Tier)[:4], intervals, strict=True))
    batch = simulate_batch(npcs, content, world_time, per_tier)
    for npc, ours in zip(npcs, batch, strict=True):
        alone = decide(npc, content, world_time, per_tier[npc.tier])
        for field in NpcDecisionFields:
            assert _same(getattr(ours, field), getattr(alone, field)), field


NpcDecisionFields = (
    "npc_id",
    "decided_at",
    "next_decision_at",
    "current_activity",
    "activity_started_at",
    "location",
    "energy",
    "mood_valence",
    "mood_arousal",
    "state",
)


@PROPERTY
@given(contents, world_times)
def test_the_table_finds_the_first_active_slot(raw: Any, world_time: float) -> None:
    content = parse_behavior(1, raw)
    day, minute = reference_decide._day_and_minute(world_time)
    for name, routine in content.routines.items():
        expected = active_slot(routine, world_time)
        found = content.tables.routines[name].slot_at(day, minute)
        if expected is None:
            assert found is None
        else:
            assert found is not None
            assert [(n, w) for n, w, _ in found.candidates] == list(expected.activities.items())


def test_equal_content_shares_one_compiled_table() -> None:
    first, second = parse_behavior(1, DEMO_BEHAVIOR), parse_behavior(2, DEMO_BEHAVIOR)
    assert first is not second
    assert first.tables is second.tables
    other = parse_behavior(3, {**DEMO_BEHAVIOR, "defaultRoutine": "merchant"})
    assert other.tables is not first.tables
