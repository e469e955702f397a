"""The world config model: defaults, bounds, merge, unknown keys, error messages."""

from __future__ import annotations

import pytest

from scheduler_daemon.world_config import (
    WorldConfig,
    WorldConfigError,
    apply_patch,
    merge_patch,
    parse_world_config,
)


def test_defaults_are_the_seeds() -> None:
    c = parse_world_config(None)
    assert (c.time_scale, c.max_npc_ticks_per_step, c.max_job_ops_per_step, c.tick_interval_seconds) == (60, 50, 10, 1)
    assert [c.tiers.for_tier(t).max_npcs for t in sorted(c.tiers.capacities())] == [20, 100, 500, 5000]
    assert list(c.tiers.intervals().values()) == [60, 300, 1800, 7200]


def test_camel_case_round_trip_keeps_unknown_keys() -> None:
    raw = {"timeScale": 120, "futureFeature": {"x": [1, 2]}, "tiers": {"detailed": {"maxNpcs": 5, "color": "red"}}}
    wire = parse_world_config(raw).to_wire()
    assert wire["timeScale"] == 120
    assert wire["futureFeature"] == {"x": [1, 2]}
    assert wire["tiers"]["detailed"] == {
        "maxNpcs": 5,
        "decisionIntervalSeconds": 60.0,
        "description": "Near player",
        "color": "red",
    }
    assert WorldConfig.model_validate(wire).to_wire() == wire


@pytest.mark.parametrize("scale", [0.001, 1, 60, 3600, 86400])
def test_time_scale_range_allows_seed_values(scale: float) -> None:
    assert parse_world_config({"timeScale": scale}).time_scale == scale


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"timeScale": 0}, "simulation.timeScale"),
        ({"timeScale": -5}, "simulation.timeScale"),
        ({"timeScale": 1e308}, "simulation.timeScale"),
        ({"timeScale": float("nan")}, "simulation.timeScale"),
        ({"timeScale": float("inf")}, "simulation.timeScale"),
        ({"tickIntervalSeconds": 0}, "simulation.tickIntervalSeconds"),
        ({"tickIntervalSeconds": -1}, "simulation.tickIntervalSeconds"),
        ({"maxNpcTicksPerStep": -1}, "simulation.maxNpcTicksPerStep"),
        ({"maxJobOpsPerStep": -3}, "simulation.maxJobOpsPerStep"),
        ({"maxNpcTicksPerStep": "lots"}, "simulation.maxNpcTicksPerStep"),
        ({"pauseSimulation": "maybe"}, "simulation.pauseSimulation"),
        ({"tiers": {"active": {"maxNpcs": -1}}}, "simulation.tiers.active.maxNpcs"),
        ({"tiers": {"dormant": {"decisionIntervalSeconds": 0}}}, "simulation.tiers.dormant.decisionIntervalSeconds"),
        ({"tickIntervalSeconds": 10, "maxCatchUpSeconds": 5}, "maxCatchUpSeconds"),
        ({"extra": float("nan")}, "simulation.extra"),
    ],
)
def test_nonsense_is_rejected_naming_world_and_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(WorldConfigError) as err:
        parse_world_config(raw, world_id=7)
    assert "world 7" in str(err.value)
    assert field in str(err.value)


def test_non_object_is_rejected() -> None:
    with pytest.raises(WorldConfigError, match="expected an object"):
        parse_world_config([1, 2], world_id=1)


def test_partial_update_keeps_the_rest() -> None:
    stored = {"timeScale": 30, "maxNpcTicksPerStep": 7, "tiers": {"active": {"maxNpcs": 3}}}
    new_raw, cfg = apply_patch(stored, {"timeScale": 120, "tiers": {"detailed": {"maxNpcs": 9}}})
    assert cfg.time_scale == 120 and cfg.max_npc_ticks_per_step == 7
    assert cfg.tiers.active.max_npcs == 3 and cfg.tiers.detailed.max_npcs == 9
    assert cfg.tiers.detailed.decision_interval_seconds == 60  # per-tier merge
    assert new_raw == {
        "timeScale": 120,
        "maxNpcTicksPerStep": 7,
        "tiers": {"active": {"maxNpcs": 3}, "detailed": {"maxNpcs": 9}},
    }


def test_null_in_patch_restores_default() -> None:
    _, cfg = apply_patch({"timeScale": 30}, {"timeScale": None})
    assert cfg.time_scale == 60


def test_defaults_layer_under_world_config() -> None:
    cfg = parse_world_config({"maxNpcTicksPerStep": 5}, defaults={"timeScale": 10, "maxNpcTicksPerStep": 99})
    assert (cfg.time_scale, cfg.max_npc_ticks_per_step) == (10, 5)


def test_merge_patch_does_not_mutate_inputs() -> None:
    base = {"a": {"b": 1}}
    merge_patch(base, {"a": {"c": 2}})
    assert base == {"a": {"b": 1}}
