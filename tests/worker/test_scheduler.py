"""The prefill chunk budget: fixed when set; on CPU steered from measured step times so a step
that also decodes takes about 2.3x a decode-only step."""

from __future__ import annotations

from chatstream_cluster.worker.engine.scheduler import ChunkBudget


def test_fixed_budget_ignores_timings() -> None:
    budget = ChunkBudget(256)
    budget.record(8, 0, 0.01)
    budget.record(8, 256, 1.0)
    assert budget.tokens(8) == 256 and budget.tokens(0) == 256


def test_adaptive_budget_converges_to_the_target_step_time() -> None:
    budget = ChunkBudget(512, adaptive=True)
    assert budget.tokens(0) == 512  # nothing decodes: the prompt goes at full speed
    assert budget.tokens(8) == ChunkBudget.FIRST  # before any measurement
    decode, fixed, per_token = 0.010, 0.006, 0.0005  # a step: fixed + decodes + tokens

    def step(tokens: int) -> float:
        return fixed + decode + tokens * per_token

    for _ in range(3):
        budget.record(8, 0, decode + fixed)
    for _ in range(30):
        chunk = budget.tokens(8)
        budget.record(8, chunk, step(chunk))
    target = budget.ratio * (decode + fixed)
    assert abs(step(budget.tokens(8)) - target) < 0.1 * target
    budget.record(8, 5, 100.0)  # a step that ran less than its chunk says nothing
    assert abs(step(budget.tokens(8)) - target) < 0.1 * target
    for _ in range(30):
        budget.record(8, budget.tokens(8), 10.0)  # very slow tokens: never under the floor
    assert budget.tokens(8) == ChunkBudget.FLOOR
