"""Queue N requests of the standard workload: python bench/queue_requests.py URL NAMESPACE N"""

import asyncio
import sys

from lending.keys import Keys
from lending.redis.connection import make_client
from simulator.bench import BenchOptions, queue_requests
from simulator.workload import Workload


async def main(url: str, namespace: str, n: int) -> None:
    options = BenchOptions()
    client = make_client(url)
    try:
        await queue_requests(client, Keys(namespace), Workload(users=options.users, catalogue=options.catalogue), n)
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
