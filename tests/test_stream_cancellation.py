"""A client that leaves must stop its generation, even when it leaves in the very tick an output
arrives (Python 3.11's `asyncio.wait_for` lost that cancellation, and the generation ran on)."""

import asyncio

import pytest

from freelunch.api.generation import get_within


@pytest.mark.parametrize("ticks_before_cancel", range(6))
def test_a_cancellation_that_lands_as_an_output_arrives_is_not_lost(ticks_before_cancel):
    async def scenario() -> bool:
        outputs: asyncio.Queue = asyncio.Queue()

        async def consume() -> None:  # what a request handler does with its outputs
            while True:
                await get_within(outputs, 30)

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0)  # the consumer now waits
        outputs.put_nowait("token")
        for _ in range(ticks_before_cancel):
            await asyncio.sleep(0)
        consumer.cancel()
        for _ in range(3):
            outputs.put_nowait("token")  # the engine keeps producing
            await asyncio.sleep(0)
        done, _ = await asyncio.wait({consumer}, timeout=1)
        consumer.cancel()
        return bool(done) and consumer.cancelled()

    assert asyncio.run(scenario()), "the consumer kept running after it was cancelled"


def test_get_within_times_out_and_returns_items():
    async def scenario() -> None:
        q: asyncio.Queue = asyncio.Queue()
        with pytest.raises(TimeoutError):
            await get_within(q, 0.01)
        q.put_nowait(7)
        assert await get_within(q, -1) == 7  # an item already there is returned even past the deadline
        assert q.empty()

    asyncio.run(scenario())
