import asyncio
import os

from gateway.client import GatewayClient


async def main() -> None:
    async with GatewayClient(os.environ["GATEWAY_API_URL"], os.environ["SERVICE_TOKEN"]) as gw:
        print(await gw.call_tool("dev-user", "echo", {"hi": 1}))  # {'hi': 1}


asyncio.run(main())
