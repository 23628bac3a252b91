"""`vtp worker` whose fetcher stops delivering once it has delivered something, the way
a worker stalled after some restarts (stream_jobs/faust_fixes.py, fix 4). Its watchdog
must restart it; the restarted process is a plain `vtp worker`."""

import asyncio
import sys

from faust.transport.drivers import aiokafka as driver

original = driver.AIOKafkaConsumerThread._fetch_records
delivered = False


async def stalling(self, consumer, active_partitions, timeout=None, max_records=None):
    global delivered
    if delivered:
        await asyncio.sleep(timeout or 1.0)
        return {}
    records = await original(self, consumer, active_partitions, timeout, max_records)
    delivered = any(
        tp.topic.endswith(".uploads") and batch for tp, batch in (records or {}).items()
    )
    return records


driver.AIOKafkaConsumerThread._fetch_records = stalling

if __name__ == "__main__":
    from vtp.cli import main

    sys.argv = ["vtp", "worker"]  # what the watchdog runs again
    sys.exit(main(sys.argv[1:]))
