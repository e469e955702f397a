"""Tier assignment, tier rules and fair per-tick selection (pure, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_daemon.simulation.npc import SIMULATED_TIERS, Tier
from scheduler_daemon.simulation.tiers import (
    NpcPlacement,
    Relevance,
    SessionView,
    TierRule,
    assign_tiers,
    determine_simulation_tier,
    select_due,
    sessions_fingerprint,
    tier_relevant_locations,
)
from scheduler_daemon.world_config import WorldConfigError, parse_world_config

# database=None: property tests must not write an example database (no I/O).
PROPERTY = settings(database=None, deadline=None, max_examples=150)

BIG: dict[Tier, int] = dict.fromkeys(SIMULATED_TIERS, 1_000)


def caps(detailed: int, active: int, ambient: int, dormant: int) -> dict[Tier, int]:
    return {
        Tier.DETAILED: detailed,
        Tier.ACTIVE: active,
        Tier.AMBIENT: ambient,
        Tier.DORMANT: dormant,
    }


def npc(npc_id: int, location: str | None = None, home: str | None = None) -> NpcPlacement:
    return NpcPlacement(id=npc_id, location=location, home=home)


def session(
    location: str | None,
    scene: Iterable[int] = (),
    involved: Iterable[int] = (),
    session_id: int = 1,
) -> SessionView:
    return SessionView(
        id=session_id,
        user_id=f"user-{session_id}",
        location=location,
        scene_npc_ids=frozenset(scene),
        involved_npc_ids=frozenset(involved),
    )


# --- determine_simulation_tier -------------------------------------------------


def test_npc_in_a_scene_is_detailed_with_relevance_0() -> None:
    sessions = [session("square", scene=[7])]
    assert determine_simulation_tier(npc(7, location="forest"), sessions) == (Tier.DETAILED, 0)


def test_npc_at_a_players_location_is_detailed_with_relevance_1() -> None:
    sessions = [session("square")]
    assert determine_simulation_tier(npc(7, location="square"), sessions) == (Tier.DETAILED, 1)


def test_npc_involved_with_a_session_is_active_with_relevance_2() -> None:
    sessions = [session("square", involved=[7])]
    assert determine_simulation_tier(npc(7, location="forest"), sessions) == (Tier.ACTIVE, 2)


def test_npc_whose_home_is_a_players_location_is_active_with_relevance_3() -> None:
    sessions = [session("square")]
    placement = npc(7, location="forest", home="square")
    assert determine_simulation_tier(placement, sessions) == (Tier.ACTIVE, 3)


def test_other_npcs_of_a_world_with_sessions_are_ambient() -> None:
    sessions = [session("square", scene=[1], involved=[2])]
    placement = npc(7, location="forest", home="mill")
    assert determine_simulation_tier(placement, sessions) == (Tier.AMBIENT, 4)


def test_without_sessions_every_npc_is_dormant() -> None:
    assert determine_simulation_tier(npc(7, location="square"), []) == (Tier.DORMANT, 5)


def test_best_rule_over_all_sessions_wins() -> None:
    sessions = [
        session("mill", involved=[7], session_id=1),
        session("square", session_id=2),
    ]
    assert determine_simulation_tier(npc(7, location="square"), sessions) == (Tier.DETAILED, 1)


def test_unknown_locations_do_not_match_each_other() -> None:
    # A session with no location must not pull every location-less NPC in.
    sessions = [session(None)]
    placement = npc(7, location=None, home=None)
    assert determine_simulation_tier(placement, sessions) == (Tier.AMBIENT, 4)


# --- assign_tiers ---------------------------------------------------------------


def test_assignment_without_capacity_pressure_keeps_natural_tiers() -> None:
    sessions = [session("square", scene=[1], involved=[3])]
    npcs = [npc(1), npc(2, location="square"), npc(3), npc(4, home="square"), npc(5)]
    result = assign_tiers(npcs, sessions, BIG)
    assert result.tiers == {
        1: Tier.DETAILED,
        2: Tier.DETAILED,
        3: Tier.ACTIVE,
        4: Tier.ACTIVE,
        5: Tier.AMBIENT,
    }
    assert result.counts == {
        Tier.DETAILED: 2,
        Tier.ACTIVE: 2,
        Tier.AMBIENT: 1,
        Tier.DORMANT: 0,
        Tier.FROZEN: 0,
    }


def test_overflow_is_demoted_by_relevance_then_id() -> None:
    # Scene NPCs (relevance 0) beat NPCs merely at the location (1), whatever
    # their ids; among equals the lower id stays.
    sessions = [session("square", scene=[9, 8])]
    npcs = [npc(1, location="square"), npc(2, location="square"), npc(9), npc(8)]
    result = assign_tiers(npcs, sessions, caps(3, 10, 10, 10))
    assert result.tiers == {8: Tier.DETAILED, 9: Tier.DETAILED, 1: Tier.DETAILED, 2: Tier.ACTIVE}
    assert result.counts[Tier.DETAILED] == 3


def test_demotion_cascades_and_demoted_npcs_outrank_natural_members() -> None:
    sessions = [session("square", scene=[1, 2], involved=[3])]
    npcs = [npc(1), npc(2), npc(3), npc(4)]  # 4 is naturally ambient
    result = assign_tiers(npcs, sessions, caps(1, 1, 1, 1))
    # 2 is demoted from detailed and, being more relevant (0) than the natural
    # active NPC 3 (2), takes the active seat; 3 cascades to ambient, 4 to dormant.
    assert result.tiers == {1: Tier.DETAILED, 2: Tier.ACTIVE, 3: Tier.AMBIENT, 4: Tier.DORMANT}


def test_npcs_beyond_all_capacities_are_frozen_and_counted() -> None:
    sessions = [session("square")]
    npcs = [npc(i, location="square" if i < 5 else None) for i in range(20)]
    result = assign_tiers(npcs, sessions, caps(2, 3, 4, 5))
    assert result.counts == {
        Tier.DETAILED: 2,
        Tier.ACTIVE: 3,
        Tier.AMBIENT: 4,
        Tier.DORMANT: 5,
        Tier.FROZEN: 6,
    }
    assert sum(result.counts.values()) == 20
    assert [i for i, t in sorted(result.tiers.items()) if t == Tier.FROZEN] == list(range(14, 20))
    # The five NPCs at the player's location fill detailed then spill over first.
    assert [result.tiers[i] for i in range(5)] == [Tier.DETAILED] * 2 + [Tier.ACTIVE] * 3


def test_no_sessions_make_everyone_dormant_subject_to_dormant_capacity() -> None:
    npcs = [npc(i, location="square") for i in range(10, 0, -1)]
    result = assign_tiers(npcs, [], caps(5, 5, 5, 7))
    assert {i for i, t in result.tiers.items() if t == Tier.DORMANT} == set(range(1, 8))
    assert {i for i, t in result.tiers.items() if t == Tier.FROZEN} == {8, 9, 10}
    assert result.counts[Tier.DETAILED] == result.counts[Tier.ACTIVE] == 0
    assert result.counts[Tier.FROZEN] == 3


def test_changed_reports_only_npcs_whose_tier_differs() -> None:
    sessions = [session("square", scene=[1])]
    result = assign_tiers([npc(1), npc(2), npc(3)], sessions, BIG)
    previous = {1: Tier.DORMANT, 2: Tier.AMBIENT, 99: Tier.ACTIVE}
    # 1 changed, 2 unchanged, 3 is new, 99 no longer exists.
    assert result.changed(previous) == {1: Tier.DETAILED, 3: Tier.AMBIENT}
    assert result.changed(result.tiers) == {}


def test_capacities_must_cover_every_simulated_tier_and_be_non_negative() -> None:
    with pytest.raises(ValueError, match="dormant"):
        assign_tiers([npc(1)], [], {Tier.DETAILED: 1, Tier.ACTIVE: 1, Tier.AMBIENT: 1})
    with pytest.raises(ValueError, match="ambient"):
        assign_tiers([npc(1)], [], caps(1, 1, -1, 1))


def test_duplicate_npc_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="npc 1"):
        assign_tiers([npc(1), npc(1)], [], BIG)


placements = st.lists(
    st.builds(
        NpcPlacement,
        id=st.integers(0, 60),
        location=st.sampled_from([None, "a", "b", "c"]),
        home=st.sampled_from([None, "a", "b", "c"]),
    ),
    max_size=40,
    unique_by=lambda p: p.id,
)
session_views = st.lists(
    st.builds(
        SessionView,
        id=st.integers(0, 5),
        user_id=st.just("u"),
        location=st.sampled_from([None, "a", "b"]),
        scene_npc_ids=st.frozensets(st.integers(0, 60), max_size=5),
        involved_npc_ids=st.frozensets(st.integers(0, 60), max_size=5),
    ),
    max_size=3,
)
capacity_maps = st.builds(caps, *(st.integers(0, 12) for _ in SIMULATED_TIERS))


@PROPERTY
@given(placements, session_views, capacity_maps)
def test_assignment_respects_capacity_and_demotes_least_relevant_first(
    npcs: list[NpcPlacement], sessions: list[SessionView], capacities: dict[Tier, int]
) -> None:
    result = assign_tiers(npcs, sessions, capacities)
    assert set(result.tiers) == {p.id for p in npcs}
    assert sum(result.counts.values()) == len(npcs)
    for tier in Tier:
        assert result.counts[tier] == sum(1 for t in result.tiers.values() if t == tier)
    for tier in SIMULATED_TIERS:
        assert result.counts[tier] <= capacities[tier]
    natural = {p.id: determine_simulation_tier(p, sessions) for p in npcs}
    for p in npcs:
        natural_tier, rank = natural[p.id]
        effective = result.tiers[p.id]
        assert effective >= natural_tier  # never promoted
        # Every tier this NPC was pushed through is full of NPCs that rank before it.
        for tier in Tier:
            if natural_tier <= tier < effective:
                assert result.counts[tier] == capacities[tier]
                members = [i for i, t in result.tiers.items() if t == tier]
                assert all((natural[i][1], i) < (rank, p.id) for i in members)


# --- tier rules -------------------------------------------------------------------


def rule(tier: str, **match: object) -> TierRule:
    return TierRule.model_validate({"match": match, "tier": tier})


def test_rule_pins_matching_npcs_to_a_minimum_tier() -> None:
    rules = [rule("active", location="market")]
    npcs = [npc(1, location="market"), npc(2, location="farm")]
    result = assign_tiers(npcs, [], BIG, rules)
    assert result.tiers == {1: Tier.ACTIVE, 2: Tier.DORMANT}
    assert result.relevance[1] == Relevance.INVOLVED


def test_rule_never_lowers_a_tier() -> None:
    rules = [rule("dormant", npcIds=[1])]
    result = assign_tiers([npc(1)], [session("x", scene=[1])], BIG, rules)
    assert result.tiers == {1: Tier.DETAILED}


def test_rule_criteria_must_all_hold() -> None:
    rules = [rule("detailed", location="market", npcIds=[1, 2])]
    npcs = [npc(1, location="market"), npc(2, location="farm"), npc(3, location="market")]
    result = assign_tiers(npcs, [], BIG, rules)
    assert result.tiers == {1: Tier.DETAILED, 2: Tier.DORMANT, 3: Tier.DORMANT}


def test_pinned_npcs_still_obey_capacity_and_rank_like_the_tiers_best() -> None:
    # Pinned detailed ranks like a scene NPC (0): it beats an NPC merely at the
    # player's location (1) for the single detailed seat, whatever the ids.
    rules = [rule("detailed", npcIds=[9])]
    npcs = [npc(1, location="square"), npc(9, location="farm")]
    result = assign_tiers(npcs, [session("square")], caps(1, 5, 5, 5), rules)
    assert result.tiers == {9: Tier.DETAILED, 1: Tier.ACTIVE}


def test_tier_rules_live_in_the_world_config_in_camel_case() -> None:
    assert parse_world_config(None).tier_rules == []
    config = parse_world_config({"tierRules": [{"match": {"npcIds": [4]}, "tier": "ambient"}]})
    (parsed,) = config.tier_rules
    assert parsed.min_tier == Tier.AMBIENT
    assert parsed.match.npc_ids == frozenset({4})
    assert config.to_wire()["tierRules"] == [{"match": {"location": None, "npcIds": [4]}, "tier": "ambient"}]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([{"match": {}, "tier": "active"}], "simulation.tierRules.0.match: match needs"),
        ([{"match": {"location": "x"}, "tier": "frozen"}], "simulation.tierRules.0.tier: "),
        ([{"match": {"npcIds": ["a"]}, "tier": "active"}], "simulation.tierRules.0.match.npcIds."),
        ([{"match": {"place": "x"}, "tier": "active"}], "simulation.tierRules.0.match.place: "),
        ({"match": {"location": "x"}, "tier": "active"}, "simulation.tierRules: Input should be a valid list"),
    ],
)
def test_tier_rule_errors_name_world_and_path(raw: object, expected: str) -> None:
    with pytest.raises(WorldConfigError) as info:
        parse_world_config({"tierRules": raw}, world_id=3)
    assert str(info.value).startswith("world 3: invalid scheduler config: ")
    assert expected in str(info.value)


# --- when to recompute ----------------------------------------------------------


def test_sessions_fingerprint_changes_exactly_when_tier_inputs_do() -> None:
    base = [session("square", scene=[1, 2], involved=[3], session_id=1), session("mill", session_id=2)]
    same = [session("mill", session_id=2), session("square", scene=[2, 1], involved=[3], session_id=1)]
    assert sessions_fingerprint(base) == sessions_fingerprint(same)  # order does not matter
    variants = [
        [],
        base[:1],
        [session("tavern", scene=[1, 2], involved=[3], session_id=1), base[1]],
        [session("square", scene=[1], involved=[3], session_id=1), base[1]],
        [session("square", scene=[1, 2], involved=[3, 4], session_id=1), base[1]],
    ]
    prints = {sessions_fingerprint(v) for v in variants}
    assert len(prints) == len(variants) and sessions_fingerprint(base) not in prints


def test_relevant_locations_are_session_and_rule_places() -> None:
    rules = [rule("active", location="market"), rule("detailed", npcIds=[1])]
    places = tier_relevant_locations([session("square"), session(None, session_id=2)], rules)
    assert places == frozenset({"square", "market"})


# --- select_due -----------------------------------------------------------------


def test_select_due_orders_by_tier_then_overdue_then_id() -> None:
    candidates = [
        (Tier.AMBIENT, 10.0, 1),
        (Tier.DETAILED, 90.0, 2),
        (Tier.ACTIVE, 50.0, 3),
        (Tier.ACTIVE, 20.0, 5),
        (Tier.ACTIVE, 20.0, 4),
        (Tier.DETAILED, 101.0, 6),  # not due yet
        (Tier.FROZEN, 0.0, 7),  # never selected
    ]
    assert select_due(candidates, 100.0, 10) == [2, 4, 5, 3, 1]
    assert select_due(candidates, 100.0, 2) == [2, 4]
    assert select_due(candidates, 100.0, 0) == []


def test_select_due_rejects_negative_budget() -> None:
    with pytest.raises(ValueError, match="budget"):
        select_due([], 0.0, -1)


candidate_lists = st.lists(
    st.tuples(
        st.sampled_from(list(Tier)),
        st.integers(-50, 50).map(float),
        st.integers(0, 10_000),
    ),
    max_size=60,
    unique_by=lambda c: c[2],
)


@PROPERTY
@given(candidate_lists, st.integers(0, 70))
def test_select_due_is_a_fair_prefix_of_the_due_set(candidates: list[tuple[Tier, float, int]], budget: int) -> None:
    now = 0.0
    chosen = select_due(candidates, now, budget)
    by_id = {c[2]: c for c in candidates}
    due = {c[2] for c in candidates if c[1] <= now and c[0] != Tier.FROZEN}
    assert len(chosen) <= budget
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= due
    if len(chosen) < budget:
        assert set(chosen) == due
    keys = [by_id[i] for i in chosen]
    assert keys == sorted(keys)  # within the pick: tier, most overdue, id
    for skipped in due - set(chosen):
        s_tier, s_next, s_id = by_id[skipped]
        for c_tier, c_next, c_id in keys:
            assert c_tier <= s_tier  # no lower tier ahead of a higher one
            if c_tier == s_tier:
                assert (c_next, c_id) < (s_next, s_id)  # never less overdue first


# --- lag under repeated ticks ---------------------------------------------------

Population = tuple[int, int, dict[Tier, int], list[tuple[Tier, int, int]]]


def simulate(
    population: list[tuple[Tier, int, int]],
    intervals: dict[Tier, int],
    tick: int,
    budget: int,
    ticks: int,
) -> tuple[dict[Tier, float], list[list[int]]]:
    """Run ``ticks`` ticks; selected NPCs are next due one tier interval later.

    Returns each tier's worst observed lag (selection time minus the
    ``next_decision_at`` it was selected for) and the per-tick selections.
    """
    tier_of = {npc_id: tier for tier, _, npc_id in population}
    next_at = {npc_id: float(first_due) for _, first_due, npc_id in population}
    max_lag: dict[Tier, float] = dict.fromkeys(SIMULATED_TIERS, 0.0)
    history: list[list[int]] = []
    for k in range(ticks):
        now = float(k * tick)
        chosen = select_due(((tier_of[i], n, i) for i, n in next_at.items()), now, budget)
        for npc_id in chosen:
            tier = tier_of[npc_id]
            max_lag[tier] = max(max_lag[tier], now - next_at[npc_id])
            next_at[npc_id] = now + intervals[tier]
        history.append(chosen)
    return max_lag, history


def demand_above(
    population: list[tuple[Tier, int, int]], intervals: dict[Tier, int], tick: int
) -> tuple[dict[Tier, tuple[Fraction, int]], Fraction]:
    """Per-tier ``(R_i, S_i)``: demand of higher tiers per tick and NPCs in tiers <= i."""
    counts = dict.fromkeys(SIMULATED_TIERS, 0)
    for tier, _, _ in population:
        counts[tier] += 1
    out: dict[Tier, tuple[Fraction, int]] = {}
    higher_demand, at_or_above = Fraction(0), 0
    for tier in SIMULATED_TIERS:
        at_or_above += counts[tier]
        out[tier] = (higher_demand, at_or_above)
        higher_demand += Fraction(counts[tier], math.ceil(intervals[tier] / tick))
    return out, higher_demand


def lag_bound(tick: int, budget: int, higher_demand: Fraction, at_or_above: int) -> float:
    """The bound proved in :func:`select_due`'s docstring (requires R_i < B)."""
    return tick * (1 + math.floor((at_or_above - 1) / (budget - higher_demand)))


@st.composite
def populations(draw: st.DrawFn, max_per_tier: int = 10) -> Population:
    tick = draw(st.integers(1, 30))
    budget = draw(st.integers(1, 6))
    intervals = {t: draw(st.integers(1, 300)) for t in SIMULATED_TIERS}
    population: list[tuple[Tier, int, int]] = []
    for tier in SIMULATED_TIERS:
        for _ in range(draw(st.integers(0, max_per_tier))):
            # First due after the tick before the start, so the initial lag is < one tick.
            first_due = draw(st.integers(-tick + 1, intervals[tier]))
            population.append((tier, first_due, len(population)))
    return tick, budget, intervals, population


@PROPERTY
@given(populations(), st.integers(0, 3))
def test_lag_is_bounded_in_every_tier_when_due_rate_fits_budget(drawn: Population, spare: int) -> None:
    tick, _, intervals, population = drawn
    per_tier, total_demand = demand_above(population, intervals, tick)
    budget = max(1, math.ceil(total_demand)) + spare  # total due rate fits the budget
    max_lag, _ = simulate(population, intervals, tick, budget, ticks=150)
    for tier in SIMULATED_TIERS:
        higher, at_or_above = per_tier[tier]
        if any(t == tier for t, _, _ in population):  # then R_i < total demand <= B
            assert max_lag[tier] <= lag_bound(tick, budget, higher, at_or_above)
    # The top tier's bound is one tick per budget-full of its own backlog.
    n_top = sum(1 for t, _, _ in population if t == Tier.DETAILED)
    assert max_lag[Tier.DETAILED] <= tick * max(1, math.ceil(n_top / budget))


@PROPERTY
@given(populations(max_per_tier=14))
def test_lag_bound_holds_under_own_tier_overload(drawn: Population) -> None:
    # The bound needs only R_i < B: a tier may itself be overloaded, and
    # oldest-first within the tier still keeps every NPC's wait bounded.
    tick, budget, intervals, population = drawn
    per_tier, _ = demand_above(population, intervals, tick)
    max_lag, _ = simulate(population, intervals, tick, budget, ticks=200)
    for tier in SIMULATED_TIERS:
        higher, at_or_above = per_tier[tier]
        if at_or_above and higher < budget:
            assert max_lag[tier] <= lag_bound(tick, budget, higher, at_or_above)


@PROPERTY
@given(populations(), st.integers(1, 40))
def test_overload_lands_on_the_lowest_tier_first(drawn: Population, extra: int) -> None:
    tick, budget, intervals, population = drawn
    base_lag, base_history = simulate(population, intervals, tick, budget, ticks=120)
    # Pile extra dormant NPCs on top: the higher tiers' schedule must not change.
    loaded = population + [(Tier.DORMANT, 0, 1_000 + i) for i in range(extra)]
    lag, history = simulate(loaded, intervals, tick, budget, ticks=120)
    tier_of = {npc_id: tier for tier, _, npc_id in loaded}
    for before, after in zip(base_history, history, strict=True):
        assert [i for i in before if tier_of[i] != Tier.DORMANT] == [i for i in after if tier_of[i] != Tier.DORMANT]
    per_tier, _ = demand_above(loaded, intervals, tick)
    for tier in (Tier.DETAILED, Tier.ACTIVE, Tier.AMBIENT):
        assert lag[tier] == base_lag[tier]
        higher, at_or_above = per_tier[tier]
        if at_or_above and higher < budget:
            assert lag[tier] <= lag_bound(tick, budget, higher, at_or_above)


def test_growing_load_raises_only_the_lowest_tiers_lag() -> None:
    tick, budget = 10, 6
    intervals = {Tier.DETAILED: 10, Tier.ACTIVE: 40, Tier.AMBIENT: 100, Tier.DORMANT: 100}
    base = [(Tier.DETAILED, 0, i) for i in range(3)] + [(Tier.ACTIVE, 0, 10 + i) for i in range(4)]
    lags: list[dict[Tier, float]] = []
    for dormant in (5, 10, 30, 60):  # demand 4 + n/10 per tick vs a budget of 6
        population = base + [(Tier.DORMANT, 0, 100 + i) for i in range(dormant)]
        lags.append(simulate(population, intervals, tick, budget, ticks=300)[0])
    assert all(lag[Tier.DETAILED] == 0.0 for lag in lags)
    assert all(lag[Tier.ACTIVE] == lags[0][Tier.ACTIVE] for lag in lags)
    dormant_lags = [lag[Tier.DORMANT] for lag in lags]
    assert dormant_lags == sorted(dormant_lags)
    assert dormant_lags[-1] > dormant_lags[1] > lags[0][Tier.ACTIVE]


def test_a_tier_starves_once_higher_tiers_use_the_whole_budget() -> None:
    tick, budget = 10, 4
    intervals = {Tier.DETAILED: 10, Tier.ACTIVE: 10, Tier.AMBIENT: 10, Tier.DORMANT: 10}
    population = [(Tier.DETAILED, 0, i) for i in range(4)] + [(Tier.AMBIENT, 0, 99)]
    _, history = simulate(population, intervals, tick, budget, ticks=200)
    # The ambient NPC is never picked: its lag (now - 0) grows with every tick.
    assert all(99 not in chosen for chosen in history)
    assert all(len(chosen) == budget for chosen in history)


@PROPERTY
@given(placements, session_views, capacity_maps, st.data())
def test_moves_between_irrelevant_places_never_change_the_assignment(
    npcs: list[NpcPlacement], sessions: list[SessionView], capacities: dict[Tier, int], data: st.DataObject
) -> None:
    # Why the scheduler may skip recomputation for such moves.
    rules = [rule("active", location="c")]
    relevant = tier_relevant_locations(sessions, rules)
    before = assign_tiers(npcs, sessions, capacities, rules)
    irrelevant = [p for p in [None, "a", "b", "c", "elsewhere"] if p not in relevant]
    moved = [
        NpcPlacement(p.id, data.draw(st.sampled_from(irrelevant)), p.home) if p.location not in relevant else p
        for p in npcs
    ]
    assert assign_tiers(moved, sessions, capacities, rules).tiers == before.tiers
