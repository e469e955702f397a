"""Behaviour content parsing and the pure decide function (no I/O, no clock)."""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_daemon.demo import DEMO_BEHAVIOR
from scheduler_daemon.plugins import load_decide_fn
from scheduler_daemon.settings import DEFAULT_BEHAVIOR
from scheduler_daemon.simulation.behavior import (
    IDLE_ACTIVITY,
    MIN_IDLE_SECONDS,
    Activity,
    BehaviorContent,
    BehaviorContentError,
    active_slot,
    decide,
    decision_draws,
    integrate_effects,
    parse_behavior,
    simulate_batch,
)
from scheduler_daemon.simulation.npc import NpcDecision, NpcState, Tier

PROPERTY = settings(database=None, deadline=None, max_examples=200)

HOUR = 3_600.0
DAY = 86_400.0
MONDAY_NOON = 12 * HOUR


def content(
    activities: dict[str, dict[str, Any]],
    slots: list[dict[str, Any]],
) -> BehaviorContent:
    """Content with one routine ``r`` (the default) made of ``slots``."""
    raw = {"activities": activities, "routines": {"r": {"slots": slots}}, "defaultRoutine": "r"}
    return parse_behavior(1, raw)


def always(**weights: float) -> dict[str, Any]:
    """A slot active all week."""
    return {"start": "00:00", "end": "00:00", "activities": weights}


def make_npc(npc_id: int = 1, **fields: Any) -> NpcState:
    values: dict[str, Any] = {
        "id": npc_id,
        "world_id": 1,
        "name": f"npc-{npc_id}",
        "tier": Tier.DETAILED,
        "next_decision_at": 0.0,
    }
    values.update(fields)
    return NpcState(**values)


DEMO = parse_behavior(1, DEMO_BEHAVIOR)

# --- parsing --------------------------------------------------------------------


def test_demo_content_parses_and_every_routine_covers_the_whole_week() -> None:
    assert set(DEMO.activities) == {"sleep", "eat", "work", "socialise", "wander"}
    assert DEMO.default_routine in DEMO.routines
    assert len(DEMO.routines) >= 2
    for name, routine in DEMO.routines.items():
        for minute in range(0, 7 * 24 * 60, 10):
            assert active_slot(routine, minute * 60.0) is not None, (name, minute)


def test_absent_content_is_empty() -> None:
    empty = parse_behavior(1, None)
    assert empty == BehaviorContent()
    assert empty.activities == {} and empty.routines == {} and empty.default_routine is None


def mutated(path: list[str | int], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(DEMO_BEHAVIOR)
    target: Any = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            mutated(["routines", "villager", "slots", 0, "activities", "dance"], 1),
            "world 7: behavior.routines.villager.slots.0.activities.dance: unknown activity",
        ),
        (
            mutated(["activities", "eat", "durationMinutes"], [50, 10]),
            "world 7: behavior.activities.eat.durationMinutes: min duration 50.0 > max",
        ),
        (
            mutated(["activities", "eat", "durationMinutes"], [0, 10]),
            "world 7: behavior.activities.eat.durationMinutes: min duration must be > 0",
        ),
        (
            mutated(["routines", "merchant", "slots", 1, "start"], "7:00"),
            "world 7: behavior.routines.merchant.slots.1.start: expected HH:MM",
        ),
        (
            mutated(["routines", "merchant", "slots", 1, "end"], "24:00"),
            "world 7: behavior.routines.merchant.slots.1.end: expected HH:MM",
        ),
        (
            mutated(["routines", "villager", "slots", 2, "activities", "work"], 0),
            "world 7: behavior.routines.villager.slots.2.activities.work: Input should be greater",
        ),
        (
            mutated(["routines", "villager", "slots", 2, "activities", "work"], -2.5),
            "world 7: behavior.routines.villager.slots.2.activities.work: Input should be greater",
        ),
        (
            mutated(["activities", "work", "energyPerHour"], "lots"),
            "world 7: behavior.activities.work.energyPerHour: Input should be a valid number",
        ),
        (
            mutated(["routines", "villager", "slots"], {"start": "00:00"}),
            "world 7: behavior.routines.villager.slots: Input should be a valid list",
        ),
        (
            mutated(["routines", "villager", "slots", 0, "days"], ["mon", "someday"]),
            "world 7: behavior.routines.villager.slots.0.days.1: Input should be 'mon'",
        ),
        (
            mutated(["activities", "work", "requirements"], {"minEnergy": 150}),
            "world 7: behavior.activities.work.requirements.minEnergy: Input should be less",
        ),
        (
            mutated(["activities", "work", "cooldownMinute"], 5),
            "world 7: behavior.activities.work.cooldownMinute: Extra inputs are not permitted",
        ),
        (
            mutated(["defaultRoutine"], "hermit"),
            "world 7: behavior.defaultRoutine: unknown routine 'hermit'",
        ),
        (
            mutated(["activities", "idle"], {"durationMinutes": [1, 2]}),
            "world 7: behavior.activities.idle: reserved activity name",
        ),
        ([1, 2], "world 7: behavior: Input should be a valid dictionary"),
    ],
)
def test_parse_errors_name_world_and_field(raw: object, expected: str) -> None:
    with pytest.raises(BehaviorContentError) as info:
        parse_behavior(7, raw)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(expected)
    assert info.value.world_id == 7


def test_content_accepts_snake_case_field_names_too() -> None:
    parsed = BehaviorContent.model_validate(
        {"activities": {"nap": {"duration_minutes": [5, 10], "energy_per_hour": 3}}}
    )
    assert parsed.activities["nap"].energy_per_hour == 3.0


# --- routine slots --------------------------------------------------------------


def test_slot_wrapping_past_midnight_belongs_to_its_start_day() -> None:
    c = content(
        {"a": {"durationMinutes": [1, 1]}},
        [{"days": ["fri"], "start": "22:00", "end": "02:00", "activities": {"a": 1}}],
    )
    routine = c.routines["r"]
    friday, saturday = 4 * DAY, 5 * DAY
    assert active_slot(routine, friday + 23 * HOUR) is not None
    assert active_slot(routine, saturday + 1 * HOUR) is not None
    assert active_slot(routine, saturday + 2 * HOUR) is None  # end is exclusive
    assert active_slot(routine, friday + 1 * HOUR) is None  # Thursday's night is not in
    assert active_slot(routine, saturday + 23 * HOUR) is None


def test_first_active_slot_wins_and_the_week_repeats() -> None:
    c = content(
        {"a": {"durationMinutes": [1, 1]}, "b": {"durationMinutes": [1, 1]}},
        [
            {"days": ["mon"], "start": "09:00", "end": "10:00", "activities": {"a": 1}},
            always(b=1),
        ],
    )
    routine = c.routines["r"]
    week = 7 * DAY
    for base in (0.0, week, 5 * week):
        slot = active_slot(routine, base + 9.5 * HOUR)
        assert slot is not None and set(slot.activities) == {"a"}
        slot = active_slot(routine, base + 10 * HOUR)
        assert slot is not None and set(slot.activities) == {"b"}


# --- effect integration -----------------------------------------------------------

rates = st.floats(-50, 50, allow_nan=False)


def activity(energy: float, valence: float = 0.0, arousal: float = 0.0) -> Activity:
    return Activity(duration_minutes=(1, 2), energy_per_hour=energy, mood_valence=valence, mood_arousal=arousal)


@PROPERTY
@given(rates, rates, rates)
def test_one_long_stretch_equals_the_sum_of_short_ones(e: float, v: float, a: float) -> None:
    act = activity(e, v, a)
    whole = integrate_effects(act, 8 * HOUR)
    parts = [integrate_effects(act, HOUR) for _ in range(8)]
    assert whole.energy == pytest.approx(sum(p.energy for p in parts), abs=1e-9)
    assert whole.mood_valence == pytest.approx(sum(p.mood_valence for p in parts), abs=1e-9)
    assert whole.mood_arousal == pytest.approx(sum(p.mood_arousal for p in parts), abs=1e-9)


@settings(database=None, deadline=None, max_examples=50)
@given(st.floats(-6, 6, allow_nan=False), rates, rates, st.sampled_from(list(Tier)[:4]))
def test_one_8_hour_decision_equals_eight_1_hour_decisions(e: float, v: float, a: float, tier: Tier) -> None:
    # Through decide() itself: an NPC that keeps doing the same activity. The
    # rates keep energy and mood inside their bounds (before clamping).
    raw = {"durationMinutes": [60, 60], "energyPerHour": e, "moodValence": v / 10, "moodArousal": a / 10}
    c = content({"same": raw}, [always(same=1)])
    start = make_npc(tier=tier, current_activity="same", activity_started_at=0.0, energy=50.0)
    whole = decide(start, c, 8 * HOUR, 60.0)
    npc = start
    for hour in range(1, 9):
        step = decide(npc, c, hour * HOUR, 60.0)
        assert step.current_activity == "same" and step.activity_started_at == hour * HOUR
        npc = make_npc(
            tier=tier,
            current_activity=step.current_activity,
            activity_started_at=step.activity_started_at,
            energy=step.energy,
            mood_valence=step.mood_valence,
            mood_arousal=step.mood_arousal,
        )
    assert npc.energy == pytest.approx(whole.energy, abs=1e-9)
    assert npc.mood_valence == pytest.approx(whole.mood_valence, abs=1e-9)
    assert npc.mood_arousal == pytest.approx(whole.mood_arousal, abs=1e-9)


def test_integration_of_nothing_or_no_time_is_zero() -> None:
    assert integrate_effects(None, 8 * HOUR) == (0.0, 0.0, 0.0)
    assert integrate_effects(activity(10), 0.0) == (0.0, 0.0, 0.0)
    assert integrate_effects(activity(10), -HOUR) == (0.0, 0.0, 0.0)
    assert integrate_effects(activity(10, 2, -4), 1.5 * HOUR) == (15.0, 3.0, -6.0)


REST: dict[str, Any] = {"durationMinutes": [60, 60], "energyPerHour": 10.0, "moodValence": 20, "moodArousal": -30}
TOIL: dict[str, Any] = {"durationMinutes": [60, 60], "energyPerHour": -10.0, "moodValence": -20}


def test_decide_applies_effects_since_the_activity_started() -> None:
    c = content({"rest": REST}, [always(rest=1)])
    npc = make_npc(current_activity="rest", activity_started_at=0.0, energy=50.0)
    result = decide(npc, c, 2 * HOUR, 60.0)
    assert (result.energy, result.mood_valence, result.mood_arousal) == (70.0, 40.0, -60.0)


def test_decide_falls_back_to_last_decision_time_then_to_no_elapsed_time() -> None:
    c = content({"rest": REST}, [always(rest=1)])
    npc = make_npc(current_activity="rest", last_decision_at=HOUR, energy=50.0)
    assert decide(npc, c, 2 * HOUR, 60.0).energy == 60.0
    npc = make_npc(current_activity="rest", energy=50.0)
    assert decide(npc, c, 2 * HOUR, 60.0).energy == 50.0


def test_decide_clamps_after_integrating() -> None:
    c = content({"rest": REST, "toil": TOIL}, [always(rest=1)])
    rested = decide(make_npc(current_activity="rest", activity_started_at=0.0, energy=95.0), c, 8 * HOUR, 60.0)
    assert (rested.energy, rested.mood_valence, rested.mood_arousal) == (100.0, 100.0, -100.0)
    toiled = decide(
        make_npc(current_activity="toil", activity_started_at=0.0, energy=50.0, mood_valence=90.0),
        c,
        20 * HOUR,
        60.0,
    )
    assert (toiled.energy, toiled.mood_valence) == (0.0, -100.0)


def test_unknown_current_activity_has_no_effect() -> None:
    c = content({"rest": REST}, [always(rest=1)])
    npc = make_npc(current_activity="retired-activity", activity_started_at=0.0, energy=40.0)
    assert decide(npc, c, 5 * HOUR, 60.0).energy == 40.0


# --- choice ---------------------------------------------------------------------

THREE: dict[str, dict[str, Any]] = {name: {"durationMinutes": [30, 30]} for name in ("a", "b", "c")}


def test_decide_is_deterministic_and_does_not_mutate_its_input() -> None:
    npc = make_npc(
        7,
        routine="villager",
        current_activity="work",
        activity_started_at=3 * HOUR,
        energy=60.0,
        state={"cooldowns": {"eat": 2 * HOUR}, "memo": [1, 2]},
    )
    snapshot = copy.deepcopy(npc.state)
    first = decide(npc, DEMO, 9 * HOUR, 600.0)
    assert decide(npc, DEMO, 9 * HOUR, 600.0) == first
    assert decide(copy.deepcopy(npc), parse_behavior(1, DEMO_BEHAVIOR), 9 * HOUR, 600.0) == first
    assert npc.state == snapshot
    assert first.state is not None and first.state["memo"] == [1, 2]


def test_choice_varies_across_npcs_and_decision_times() -> None:
    c = content(THREE, [always(a=1, b=1, c=1)])
    by_npc = Counter(decide(make_npc(i), c, MONDAY_NOON, 60.0).current_activity for i in range(300))
    by_time = Counter(decide(make_npc(1), c, MONDAY_NOON + t, 60.0).current_activity for t in range(300))
    # Equal weights: each of the three should get roughly a third (100 +- 10 sd).
    for counts in (by_npc, by_time):
        assert set(counts) == {"a", "b", "c"}
        assert all(60 <= n <= 140 for n in counts.values()), counts
    # The same NPC at another time is an independent draw, not a replay.
    seq_1 = [decide(make_npc(1), c, MONDAY_NOON + t, 60.0).current_activity for t in range(40)]
    seq_2 = [decide(make_npc(2), c, MONDAY_NOON + t, 60.0).current_activity for t in range(40)]
    assert seq_1 != seq_2


def test_weights_shape_the_choice() -> None:
    c = content(THREE, [always(a=9, b=1)])
    counts = Counter(decide(make_npc(i), c, MONDAY_NOON, 60.0).current_activity for i in range(400))
    assert set(counts) == {"a", "b"}
    assert counts["a"] > 3 * counts["b"]


def test_decision_draws_are_stable_uniform_and_input_sensitive() -> None:
    assert decision_draws(1, 2, 3.5) == decision_draws(1, 2, 3.5)
    assert decision_draws(1, 2, 0.0) == decision_draws(1, 2, -0.0)
    assert decision_draws(1, 2, 3) == decision_draws(1, 2, 3.0)
    draws = {decision_draws(w, n, t) for w in (1, 2) for n in (1, 2) for t in (0.0, 1.0, 1e-9)}
    assert len(draws) == 12
    assert decision_draws(12, 3, 0.0) != decision_draws(1, 23, 0.0)  # no digit-gluing collisions
    values = [u for n in range(2000) for u in decision_draws(7, n, 60.0)]
    assert all(0.0 <= u < 1.0 for u in values)
    # Roughly uniform: each tenth of [0, 1) gets its share (6,000 draws, ±25 %).
    tenths = Counter(int(u * 10) for u in values)
    assert all(450 <= tenths[i] <= 750 for i in range(10)), tenths


COOLING: dict[str, dict[str, Any]] = {
    "fav": {"durationMinutes": [30, 30], "cooldownMinutes": 60},
    "other": {"durationMinutes": [30, 30]},
}


def test_an_activity_on_cooldown_is_not_picked() -> None:
    c = content(COOLING, [always(fav=1000, other=1)])
    for i in range(100):
        npc = make_npc(i, current_activity="fav", activity_started_at=MONDAY_NOON - 1800)
        result = decide(npc, c, MONDAY_NOON, 60.0)
        assert result.current_activity == "other"
        assert result.state == {"cooldowns": {"fav": MONDAY_NOON}}


def test_a_stored_cooldown_blocks_until_it_expires() -> None:
    c = content(COOLING, [always(fav=1000, other=1)])
    state = {"cooldowns": {"fav": MONDAY_NOON}}
    during = [
        decide(
            make_npc(i, current_activity="other", activity_started_at=MONDAY_NOON, state=state),
            c,
            MONDAY_NOON + 59 * 60,
            60.0,
        )
        for i in range(50)
    ]
    assert {d.current_activity for d in during} == {"other"}
    assert all(d.state == state for d in during)  # still running: kept
    after = [
        decide(
            make_npc(i, current_activity="other", activity_started_at=MONDAY_NOON, state=state),
            c,
            MONDAY_NOON + 60 * 60,
            60.0,
        )
        for i in range(50)
    ]
    assert Counter(d.current_activity for d in after)["fav"] >= 45
    assert all(d.state == {"cooldowns": {}} for d in after)  # expired: pruned


def test_when_everything_is_cooling_down_the_favourite_is_repeated() -> None:
    c = content(COOLING, [always(fav=2)])
    npc = make_npc(current_activity="fav", activity_started_at=MONDAY_NOON - 1800)
    assert decide(npc, c, MONDAY_NOON, 60.0).current_activity == "fav"


def test_malformed_stored_cooldowns_are_ignored() -> None:
    c = content(COOLING, [always(fav=1000, other=1)])
    for bad in ("nonsense", {"fav": "soon"}, {"fav": None}, {"fav": True}, {"ghost": 1.0}):
        npc = make_npc(current_activity="other", state={"cooldowns": bad})
        result = decide(npc, c, MONDAY_NOON, 60.0)
        assert result.current_activity == "fav"


REQUIRING: dict[str, dict[str, Any]] = {
    "work": {"durationMinutes": [30, 30], "requirements": {"minEnergy": 20}},
    "nap": {"durationMinutes": [30, 30], "requirements": {"maxEnergy": 30}},
    "toil": {"durationMinutes": [60, 60], "energyPerHour": -8.0},
}


def test_requirements_are_checked_against_the_updated_energy() -> None:
    c = content(REQUIRING, [always(work=1000, nap=1)])
    for i in range(100):
        # 25 energy minus two hours of toil (-16) leaves 9: too tired to work.
        tired = make_npc(i, current_activity="toil", activity_started_at=0.0, energy=25.0)
        assert decide(tired, c, 2 * HOUR, 60.0).current_activity == "nap"
        fresh = make_npc(i, energy=80.0)
        assert decide(fresh, c, 2 * HOUR, 60.0).current_activity == "work"


def test_nothing_eligible_means_idle() -> None:
    c = content(REQUIRING, [always(work=1)])
    npc = make_npc(energy=5.0, location="bench")
    result = decide(npc, c, MONDAY_NOON, 300.0)
    assert result.current_activity == IDLE_ACTIVITY
    assert result.location == "bench"
    assert result.next_decision_at == MONDAY_NOON + 300.0


def test_empty_content_idles_for_one_tier_interval() -> None:
    empty = parse_behavior(1, None)
    for tier in (Tier.DETAILED, Tier.DORMANT):
        npc = make_npc(tier=tier, location="well", current_activity="dance", energy=33.0)
        result = decide(npc, empty, 500.0, 900.0)
        assert result == NpcDecision(
            npc_id=1,
            decided_at=500.0,
            next_decision_at=1400.0,
            current_activity=IDLE_ACTIVITY,
            activity_started_at=500.0,
            location="well",
            energy=33.0,
            mood_valence=0.0,
            mood_arousal=0.0,
            state={"cooldowns": {}},
        )
    assert decide(make_npc(), empty, 500.0, 0.0).next_decision_at == 500.0 + MIN_IDLE_SECONDS


def test_unknown_npc_routine_falls_back_to_the_default_routine() -> None:
    c = content(THREE, [always(b=1)])
    assert decide(make_npc(routine="gone"), c, 0.0, 60.0).current_activity == "b"


# --- location and timing --------------------------------------------------------


PLACES: dict[str, dict[str, Any]] = {
    "home_act": {"durationMinutes": [5, 5], "location": "home"},
    "stay": {"durationMinutes": [5, 5]},
    "fixed": {"durationMinutes": [5, 5], "location": "forge"},
    "either": {"durationMinutes": [5, 5], "location": ["inn", "home"]},
}


def location_for(act: str, npc: NpcState) -> str | None:
    return decide(npc, content(PLACES, [always(**{act: 1})]), 0.0, 60.0).location


def test_location_resolution() -> None:
    assert location_for("home_act", make_npc(location="field", home="cottage")) == "cottage"
    assert location_for("home_act", make_npc(location="field", home=None)) == "field"
    assert location_for("stay", make_npc(location="field", home="cottage")) == "field"
    assert location_for("fixed", make_npc(location="field", home="cottage")) == "forge"
    picks = {location_for("either", make_npc(i, location="x", home="cot")) for i in range(60)}
    assert picks == {"inn", "cot"}


def test_detailed_npcs_decide_again_when_the_activity_ends() -> None:
    c = content({"a": {"durationMinutes": [10, 20]}}, [always(a=1)])
    for i in range(50):
        result = decide(make_npc(i, tier=Tier.DETAILED), c, MONDAY_NOON, 6 * HOUR)
        assert result.activity_started_at == result.decided_at == MONDAY_NOON
        assert MONDAY_NOON + 600 <= result.next_decision_at <= MONDAY_NOON + 1200


def test_coarse_tiers_decide_again_after_their_interval_at_the_earliest() -> None:
    c = content({"a": {"durationMinutes": [10, 20]}}, [always(a=1)])
    for tier in (Tier.ACTIVE, Tier.AMBIENT, Tier.DORMANT):
        long_interval = decide(make_npc(tier=tier), c, MONDAY_NOON, 6 * HOUR)
        assert long_interval.next_decision_at == MONDAY_NOON + 6 * HOUR
        short_interval = decide(make_npc(tier=tier), c, MONDAY_NOON, 60.0)
        detailed = decide(make_npc(tier=Tier.DETAILED), c, MONDAY_NOON, 60.0)
        assert short_interval.next_decision_at == detailed.next_decision_at > MONDAY_NOON + 60


@PROPERTY
@given(
    st.floats(-1e7, 1e12, allow_nan=False),
    st.sampled_from(list(Tier)),
    st.floats(0, 1e6, allow_nan=False),
    st.integers(0, 2**40),
)
def test_next_decision_is_always_strictly_later(world_time: float, tier: Tier, interval: float, npc_id: int) -> None:
    npc = make_npc(npc_id, tier=tier, routine="night_owl")
    result = decide(npc, DEMO, world_time, interval)
    assert result.next_decision_at > world_time
    assert result.decided_at == world_time
    assert 0.0 <= result.energy <= 100.0


def test_decide_rejects_non_finite_times_and_negative_intervals() -> None:
    with pytest.raises(ValueError, match="world_time"):
        decide(make_npc(), DEMO, math.inf, 60.0)
    with pytest.raises(ValueError, match="tier_interval"):
        decide(make_npc(), DEMO, 0.0, -1.0)


# --- a day in the village -----------------------------------------------------------


def live(npc: NpcState, until: float) -> list[NpcDecision]:
    """Chain detailed decisions from ``npc.next_decision_at`` until ``until``."""
    decisions: list[NpcDecision] = []
    now = npc.next_decision_at
    while now < until:
        d = decide(npc, DEMO, now, 60.0)
        decisions.append(d)
        npc.current_activity, npc.activity_started_at = d.current_activity, d.activity_started_at
        npc.location, npc.energy = d.location, d.energy
        npc.mood_valence, npc.mood_arousal = d.mood_valence, d.mood_arousal
        npc.last_decision_at, npc.state = d.decided_at, d.state or {}
        now = d.next_decision_at
    return decisions


def doing_at(decisions: list[NpcDecision], t: float) -> NpcDecision:
    return next(d for d in reversed(decisions) if d.decided_at <= t)


@pytest.mark.parametrize("npc_id", range(1, 21))
def test_a_villager_lives_a_varied_day_and_sleeps_at_night(npc_id: int) -> None:
    npc = make_npc(npc_id, routine="villager", home=f"cottage-{npc_id}", location="square")
    decisions = live(npc, until=DAY + 6 * HOUR)  # Monday 00:00 to Tuesday 06:00
    daytime = {d.current_activity for d in decisions if 6 * HOUR <= d.decided_at < 22 * HOUR}
    assert len(daytime | {"sleep"}) >= 4  # sleep plus at least three more through the day
    assert len({d.current_activity for d in decisions if d.decided_at < DAY}) >= 3
    for night in (3 * HOUR, DAY + 3 * HOUR):
        asleep = doing_at(decisions, night)
        assert asleep.current_activity == "sleep"
        assert asleep.location == f"cottage-{npc_id}"
    assert doing_at(decisions, 10 * HOUR).current_activity in {"work", "wander"}
    assert all(0.0 <= d.energy <= 100.0 for d in decisions)
    times = [d.decided_at for d in decisions]
    assert times == sorted(set(times))


# --- plug-ins and batches ----------------------------------------------------------


def test_load_decide_fn_resolves_the_default() -> None:
    assert load_decide_fn() is decide
    assert load_decide_fn(DEFAULT_BEHAVIOR) is decide


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("scheduler_daemon.simulation.behavior.decide", "expected 'package.module:callable'"),
        ("scheduler_daemon.simulation.behavior:", "expected 'package.module:callable'"),
        (":decide", "expected 'package.module:callable'"),
        ("no_such_module_xyz:decide", "module 'no_such_module_xyz' not found"),
        ("scheduler_daemon.no_such_module:decide", "not found"),
        ("scheduler_daemon.simulation.behavior:nope", "has no attribute 'nope'"),
        ("scheduler_daemon.demo:DEMO_BEHAVIOR", "is not callable"),
    ],
)
def test_load_decide_fn_errors_name_the_spec(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match="decide function") as info:
        load_decide_fn(spec)
    assert repr(spec) in str(info.value)
    assert problem in str(info.value)


INTERVALS = {Tier.DETAILED: 60.0, Tier.ACTIVE: 600.0, Tier.AMBIENT: 3600.0, Tier.DORMANT: 6 * HOUR}


def test_simulate_batch_uses_each_npcs_tier_interval() -> None:
    npcs = [make_npc(i, tier=tier, routine="villager") for i, tier in enumerate(Tier) if i < 4]
    batch = simulate_batch(npcs, DEMO, MONDAY_NOON, INTERVALS)
    assert batch == [decide(n, DEMO, MONDAY_NOON, INTERVALS[n.tier]) for n in npcs]
    assert batch[3].next_decision_at >= MONDAY_NOON + 6 * HOUR


def test_simulate_batch_requires_an_interval_for_every_tier_it_meets() -> None:
    with pytest.raises(ValueError, match="frozen"):
        simulate_batch([make_npc(tier=Tier.FROZEN)], DEMO, 0.0, INTERVALS)


def test_simulate_batch_rejects_a_plugin_that_would_stall_an_npc() -> None:
    def stalling(npc: NpcState, c: BehaviorContent, now: float, interval: float) -> NpcDecision:
        d = decide(npc, c, now, interval)
        d.next_decision_at = now
        return d

    def confused(npc: NpcState, c: BehaviorContent, now: float, interval: float) -> NpcDecision:
        d = decide(npc, c, now, interval)
        d.npc_id += 1
        return d

    with pytest.raises(ValueError, match="not after"):
        simulate_batch([make_npc()], DEMO, 0.0, INTERVALS, stalling)
    with pytest.raises(ValueError, match="decision for npc 2"):
        simulate_batch([make_npc()], DEMO, 0.0, INTERVALS, confused)
