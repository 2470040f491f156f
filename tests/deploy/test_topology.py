"""The docker-compose topology as plain processes: Redis, two gateways, two workers and a
minimal loopback TCP load balancer (round robin, like the nginx service), streaming through it."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator

import openai
import pytest
import yaml

from chatstream_cluster.shared.redis_server import free_port
from tests.cluster import ROOT
from tests.faults.test_worker_crash import expected

pytestmark = pytest.mark.slow


class RoundRobinProxy:
    """A TCP proxy on 127.0.0.1 handing each new connection to the next backend."""

    def __init__(self, backends: list[int]) -> None:
        self.port = free_port()
        self.backends = itertools.cycle(backends)
        self.connections: list[int] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = next(self.backends)
        self.connections.append(backend)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _run(self) -> None:
        self.loop.run_until_complete(self._serve())
        self.loop.close()

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.ready.set()
        await self.stop.wait()
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> RoundRobinProxy:
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(5)


def compose_services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


@pytest.fixture
def topology(cluster) -> Iterator[tuple[list, RoundRobinProxy]]:  # noqa: ANN001
    services = compose_services()
    gateways = [name for name in services if name.startswith("gateway")]
    workers = [name for name in services if name.startswith("worker-gpu")]
    assert len(gateways) == 2 and len(workers) == 2, "the compose file's topology changed"
    for name in workers:
        cluster.start_worker("mock", worker_id=name, mock_tokens_per_s=200)
    procs = [cluster.start_gateway() for _ in gateways]
    for gw in procs:
        cluster.wait_ready(gw, workers=2)
    with RoundRobinProxy([gw.port for gw in procs]) as proxy:
        yield procs, proxy


def test_streams_through_the_load_balancer_reach_both_gateways(topology) -> None:  # noqa: ANN001
    gateways, proxy = topology
    for i in range(4):
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="x", timeout=30
        )
        text = ""
        for chunk in client.chat.completions.create(
            model="mock",
            messages=[{"role": "user", "content": f"lb {i}"}],
            stream=True,
            max_tokens=12,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        client.close()
        assert text == expected(f"lb {i}", 12)
    assert {gw.port for gw in gateways} <= set(proxy.connections)


def test_each_gateway_streams_directly(topology) -> None:  # noqa: ANN001
    gateways, _ = topology
    for gw in gateways:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", timeout=30)
        reply = client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "direct"}], max_tokens=6
        )
        assert reply.choices[0].message.content == expected("direct", 6)
