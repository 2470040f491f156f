"""shared/models.py and the model parts of shared/keys.py: served names in key names, and the
registry of the models a cluster knows."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from chatstream_cluster.shared.keys import SAFE_ID, Keys, model_tag
from chatstream_cluster.shared.models import ModelRegistry, check_served_name


def test_a_plain_name_is_its_own_tag_and_any_other_gets_a_digest() -> None:
    assert model_tag("qwen-7b") == "qwen-7b"
    tags = {name: model_tag(name) for name in (
        "Qwen/Qwen2.5-7B-Instruct", "Qwen_Qwen2.5-7B-Instruct", "/models/a b", "/models/a_b",
        "x" * 65, "{slot}", "a:b")}
    assert tags["Qwen_Qwen2.5-7B-Instruct"] == "Qwen_Qwen2.5-7B-Instruct"  # plain
    assert tags["Qwen/Qwen2.5-7B-Instruct"].startswith("Qwen_Qwen2.5-7B-Instruct-")
    assert len(set(tags.values())) == len(tags)  # "a b" and "a_b" stay apart
    keys = Keys("p")
    for name, tag in tags.items():
        assert SAFE_ID.match(tag) and "{" not in tag and ":" not in tag, name
        assert SAFE_ID.match(keys.model_semaphore(name))
        assert keys.job_stream(name, 2) == f"p:model:{tag}:jobs:p2"
    # A model named like another key's part cannot reach it.
    assert keys.job_stream("partitions") != keys.queue_partitions
    assert keys.job_stream("dead") != keys.dead_letter


@pytest.mark.parametrize("bad", ["", "a\nb", "tab\there", "x" * 257])
def test_served_names_must_be_printable_and_short(bad: str) -> None:
    with pytest.raises(ValueError):
        check_served_name(bad)
    assert check_served_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


async def test_the_registry_remembers_models_and_forgets_old_ones(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    registry = ModelRegistry(redis, keys)
    assert await registry.known() == {}
    await registry.seen("alpha")
    await registry.seen("org/beta")
    known = await registry.known()
    assert set(known) == {"alpha", "org/beta"} and all(0 <= age < 5 for age in known.values())
    await redis.hset(keys.models, "stale", 1)  # seen at the epoch: long forgotten
    assert set(await registry.known()) == {"alpha", "org/beta"}
    assert not await redis.hexists(keys.models, "stale")  # dropped as it was read
