"""Batch sampling on the device (worker/engine/sampling.py): the counter-based draw equals its
plain-Python reference on both code paths, every row keeps its own parameters, top-k / top-p
cut where they should, the draws follow the distribution, and the per-row table follows the
scheduler's rows."""

from __future__ import annotations

import torch

from chatstream_cluster.shared.schemas import SamplingParams
from chatstream_cluster.worker.engine import sampling
from chatstream_cluster.worker.engine.sampling import (
    BELOW_ONE,
    SamplingRows,
    draw_uniform,
    sample,
    seed_key,
    splitmix64,
    uniform_reference,
)

CPU = torch.device("cpu")
KEYS = [seed_key(s) for s in (0, 1, 42, -7, 2**63 + 5, 2**70 + 3)]
KEYS += [seed_key(None) for _ in range(4)]


def test_splitmix64_matches_its_published_values() -> None:
    # The first outputs of splitmix64 seeded with 0 (Vigna's reference implementation).
    state, outs = 0, []
    for _ in range(3):
        state = (state + 0x9E3779B97F4A7C15) & sampling.MASK64
        outs.append(splitmix64(state))
    assert outs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_draw_equals_the_reference_on_both_paths() -> None:
    positions = [0, 1, 2, 100, 4095, 2**31 + 3]
    keys = torch.tensor([k for k in KEYS for _ in positions], dtype=torch.long)
    fed = torch.tensor([p for _ in KEYS for p in positions], dtype=torch.long)
    expected = torch.tensor([uniform_reference(k, p + 1) * BELOW_ONE
                             for k in KEYS for p in positions], dtype=torch.float32)
    numpy_path = draw_uniform(keys, fed)
    torch_path = sampling._draw_torch(keys, fed)  # integer tensor ops, as on a GPU
    assert torch.equal(numpy_path, expected)
    assert torch.equal(torch_path, expected)
    assert float(numpy_path.min()) >= 0 and float(numpy_path.max()) < 1
    assert len(set(numpy_path.tolist())) == len(expected)  # no two draws alike here


def table_for(params: list[SamplingParams], keys: list[int] | None = None) -> SamplingRows:
    table = SamplingRows(len(params) + 1, CPU)
    for row, p in enumerate(params):
        table.admit(row, p, keys[row] if keys else seed_key(row))
    return table


def test_each_row_keeps_its_own_parameters() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(temperature=0),  # greedy
        SamplingParams(top_k=1),  # only the best token
        SamplingParams(top_p=1e-6),  # only the best token
        SamplingParams(temperature=1.0),  # anything
    ]
    table = table_for(params)
    best = logits.argmax(-1)
    seen = set()
    for position in range(200):
        fed = torch.full((4,), position)
        tokens = sample(logits, slice(0, 4), fed, table)
        assert tokens[:3].tolist() == best[:3].tolist()
        seen.add(int(tokens[3]))
    assert len(seen) > 20  # the free row really samples


def test_top_k_and_top_p_keep_only_the_head() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05])
    logits = probs.log().repeat(3, 1)
    table = table_for([SamplingParams(top_k=2), SamplingParams(top_p=0.65),
                       SamplingParams(top_p=0.75, top_k=4)])
    counts = torch.zeros(3, 5)
    for position in range(3000):
        tokens = sample(logits, slice(0, 3), torch.full((3,), position), table)
        counts[torch.arange(3), tokens] += 1
    assert counts[0, 2:].sum() == 0 and counts[0, :2].min() > 0  # top-2
    # top-p 0.65: 0.4 (mass before: 0) and 0.3 (before: 0.4) stay; 0.2 (before 0.7) goes.
    assert counts[1, 2:].sum() == 0 and counts[1, :2].min() > 0
    assert counts[2, 3:].sum() == 0 and counts[2, :3].min() > 0  # 0.2 has 0.7 before it
    share = counts[0, 0] / counts[0].sum()  # renormalised: 0.4 / 0.7
    assert abs(float(share) - 0.4 / 0.7) < 0.04


def test_draws_follow_the_distribution_and_skip_suppressed_tokens() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    suppress = torch.tensor([0.0, 0.0, 0.0, 0.0, float("-inf")])
    table = table_for([SamplingParams()] * 8)
    counts = torch.zeros(5)
    logits = probs.log().repeat(8, 1)
    for position in range(1000):
        tokens = sample(logits, slice(0, 8), torch.full((8,), position), table, suppress)
        counts += torch.bincount(tokens, minlength=5)
    assert counts[4] == 0
    expected = probs[:4] / probs[:4].sum()
    assert torch.allclose(counts[:4] / counts.sum(), expected, atol=0.02)


def test_a_rows_draw_depends_on_its_key_and_position_only() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 300)
    key = seed_key(1234)
    alone = table_for([SamplingParams(top_p=0.9)], [key])
    crowd_params = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=0),
                    SamplingParams(top_p=0.9)]
    crowd = table_for(crowd_params, [seed_key(1), seed_key(2), key])
    rows = torch.tensor([2, 0, 1])  # the same sequence, in row 2 and sampled first
    for position in (5, 6, 700):
        mine = sample(logits, slice(0, 1), torch.tensor([position]), alone)
        many = sample(torch.cat([logits, torch.randn(2, 300)]), rows,
                      torch.tensor([position, 3, 9]), crowd)
        assert int(mine[0]) == int(many[0])


def test_the_table_follows_rows_and_counts_what_the_batch_needs() -> None:
    table = SamplingRows(4, CPU)
    table.admit(0, SamplingParams(temperature=0), 11)
    table.admit(1, SamplingParams(top_p=0.5, temperature=0.7), 22)
    table.admit(2, SamplingParams(top_k=5), 33)
    assert (table.greedy_rows, table.top_p_rows, table.top_k_rows) == (1, 1, 1)
    assert not table.all_greedy
    table.release(0)
    table.move(2, 0)  # the last row moves into the freed one
    assert table.key[0] == 33 and table.top_k[0] == 5 and not table.greedy[0]
    assert (table.greedy_rows, table.top_p_rows, table.top_k_rows) == (0, 1, 1)
    table.release(1)
    table.release(0)
    table.admit(0, SamplingParams(temperature=0), 1)
    assert table.all_greedy
    table.reset()
    assert (table.greedy_rows, table.top_p_rows, table.top_k_rows) == (0, 0, 0)
