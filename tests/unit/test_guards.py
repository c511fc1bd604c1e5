"""The answer budget and the broadcast filter: bounds that hold whatever a forger sends."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from weaved.core.guards import ANSWER_RATIO, AnswerBudget, BroadcastFilter
from weaved.core.types import Endpoint, PeerName

A = Endpoint("198.51.100.1", 6783)
ORIGIN = PeerName("02:00:00:00:00:01")

steps = st.lists(st.tuples(st.sampled_from(["earn", "spend", "wait"]), st.integers(0, 5000)), max_size=60)


@given(steps)
def test_answers_never_exceed_four_times_what_the_source_sent(ops: list[tuple[str, int]]) -> None:
    budget = AnswerBudget()
    now, earned, spent = 0.0, 0, 0
    for op, n in ops:
        if op == "earn":
            budget.earn(A, n, now, cap=1 << 30)
            earned += n
        elif op == "spend":
            if budget.spend(A, n, now):
                spent += n
        else:
            now += n / 100
    assert spent <= ANSWER_RATIO * earned


def test_credit_is_capped_and_forgotten_after_the_window() -> None:
    budget = AnswerBudget(window=60.0)
    budget.earn(A, 10_000, 0.0, cap=1000)
    assert budget.spend(A, 1000, 0.0) and not budget.spend(A, 1, 0.0)
    budget.grant(A, 5000, 1.0)
    assert not budget.spend(A, 5000, 62.0), "a grant not used within the window is gone"


def test_the_budget_table_is_bounded() -> None:
    budget = AnswerBudget(limit=64)
    for i in range(1000):
        budget.earn(Endpoint(f"203.0.113.{i % 250}", 1000 + i), 10, float(i) / 1000, cap=100)
    assert len(budget) <= 64


def test_a_broadcast_is_handled_once_per_window() -> None:
    seen = BroadcastFilter(window=2.0)
    assert seen.first_time(ORIGIN, "ipam", b"x", 0.0)
    assert not seen.first_time(ORIGIN, "ipam", b"x", 1.9)
    assert seen.first_time(ORIGIN, "other", b"x", 1.9)
    assert seen.first_time(ORIGIN, "ipam", b"x", 2.0)


def test_the_broadcast_filter_is_bounded() -> None:
    seen = BroadcastFilter(limit=100)
    for i in range(10_000):
        assert seen.first_time(ORIGIN, "ipam", i.to_bytes(4, "big"), 0.0)
    assert len(seen) <= 100


def test_a_rate_gate_says_yes_once_per_interval_per_key_and_stays_bounded() -> None:
    from weaved.core.guards import RateGate
    gate = RateGate(limit=8)
    assert gate.allow("a", 0.0, 1.0) and not gate.allow("a", 0.5, 1.0) and gate.allow("a", 1.0, 1.0)
    assert gate.allow("b", 0.5, 1.0)  # keys are independent
    for i in range(1000):
        gate.allow(("flood", i), 2.0, 1.0)
    assert len(gate) <= 8
