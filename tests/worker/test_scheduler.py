"""The prefill chunk budget: fixed when set; on CPU sized from measured step times so a step
that also decodes stays within 2.5x a decode-only step."""

from __future__ import annotations

from chatstream_cluster.worker.engine.scheduler import ChunkBudget


def test_fixed_budget_ignores_timings() -> None:
    budget = ChunkBudget(256)
    budget.record(8, 0, 0.01)
    budget.record(8, 256, 1.0)
    assert budget.tokens(8) == 256 and budget.tokens(0) == 256


def test_adaptive_budget_keeps_mixed_steps_near_the_decode_pace() -> None:
    budget = ChunkBudget(512, adaptive=True)
    assert budget.tokens(0) == 512  # nothing decodes: the prompt goes at full speed
    assert budget.tokens(8) == ChunkBudget.FIRST  # costs unknown yet: a small chunk
    budget.record(8, 0, 0.010)  # a decode-only step: 10 ms
    budget.record(8, 64, 0.010 + 64 * 0.0005)  # 0.5 ms per prompt token on top
    assert budget.tokens(8) == 30  # (2.5 - 1) x 10 ms / 0.5 ms
    assert budget.tokens(0) == 512
    budget.record(8, 0, 0.200)  # decoding got much slower: room for more prompt per step
    assert 30 < budget.tokens(8) <= 512
    budget.record(8, 30, 10.0)  # a very slow prompt token: never under the floor
    assert budget.tokens(8) >= ChunkBudget.FLOOR
