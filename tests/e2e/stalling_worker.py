"""`vtp worker` whose fetcher stops delivering once it has delivered something, the way
a worker stalled after some restarts (docs/adr/0001-faust-fixes.md). Its watchdog must
make it exit for the harness to start it again; started again (the same command), it
finds its marker and runs as a plain `vtp worker`."""

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


if __name__ == "__main__":
    from vtp.cli import main
    from vtp.core.settings import load_settings

    marker = load_settings().home / "stalled-once"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        driver.AIOKafkaConsumerThread._fetch_records = stalling

    sys.argv = ["vtp", "worker"]
    sys.exit(main(sys.argv[1:]))
