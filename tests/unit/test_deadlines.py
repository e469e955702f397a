"""The runner's deadline queue behaves exactly like a heap of ``(deadline, world_id, generation)``."""

from __future__ import annotations

import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_daemon.deadlines import DeadlineWheel, Entry

# Deadlines on and near bucket edges (1 ms), including exact multiples and negative times.
deadlines = st.one_of(
    st.floats(min_value=-0.01, max_value=0.05, allow_nan=False),
    st.integers(min_value=-10, max_value=50).map(lambda ms: ms / 1000),
    st.integers(min_value=0, max_value=50).map(lambda ms: ms / 1000 + 1e-12),
    # A few bucket edges, densely: several deadlines (and horizons) inside one millisecond.
    st.tuples(st.integers(0, 3), st.integers(0, 9)).map(lambda t: t[0] / 1000 + t[1] / 10_000),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), deadlines, st.integers(0, 20), st.integers(0, 3)),
        st.tuples(st.just("pop"), deadlines),
        st.tuples(st.just("earliest"), st.integers(0, 3)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_matches_a_heap_model(operations: list[tuple[object, ...]]) -> None:
    """Pops return exactly the entries due by the horizon, in heap order; ``earliest`` skips stale ones.

    As in the runner, staleness is permanent (a generation only grows), and
    ``earliest`` may drop stale entries it walks past: the comparison is over
    the current entries.
    """
    wheel = DeadlineWheel()
    model: list[Entry] = []
    stale: set[int] = set()

    def current(entry: Entry) -> bool:
        return entry[2] not in stale

    for op in operations:
        if op[0] == "push":
            _, deadline, world, gen = op
            assert isinstance(deadline, float) and isinstance(world, int) and isinstance(gen, int)
            if gen in stale:
                continue
            wheel.push(deadline, world, gen)
            heapq.heappush(model, (deadline, world, gen))
        elif op[0] == "pop":
            horizon = op[1]
            assert isinstance(horizon, float)
            expected = []
            while model and model[0][0] <= horizon:
                expected.append(heapq.heappop(model))
            assert [e for e in wheel.pop_due(horizon) if current(e)] == [e for e in expected if current(e)]
        else:
            gen = op[1]
            assert isinstance(gen, int)
            stale.add(gen)
            live = [e for e in model if current(e)]
            assert wheel.earliest(current) == (min(live)[0] if live else None)
        assert sum(map(current, model)) <= len(wheel) <= len(model)


def test_an_entry_is_never_popped_before_its_deadline() -> None:
    """The bucket holding the horizon is split: a later entry in the same millisecond stays queued."""
    wheel = DeadlineWheel()
    wheel.push(1.0004, 1, 0)
    wheel.push(1.0001, 2, 0)
    assert wheel.pop_due(1.0002) == [(1.0001, 2, 0)]
    assert wheel.earliest(lambda e: True) == 1.0004
    assert wheel.pop_due(1.0004) == [(1.0004, 1, 0)]
    assert len(wheel) == 0 and wheel.earliest(lambda e: True) is None


def test_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError, match="resolution must be > 0"):
        DeadlineWheel(0.0)
