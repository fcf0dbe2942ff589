import asyncio
import os

from gateway.client import DeviceOffline, GatewayClient, ToolFailed


async def main() -> None:
    async with GatewayClient(os.environ["GATEWAY_API_URL"], os.environ["SERVICE_TOKEN"]) as gw:
        try:
            await gw.call_tool("dev-user", "fail", timeout=10)
        except ToolFailed as exc:  # the tool ran and reported an error
            print("tool failed:", exc.code, exc.detail)
        except DeviceOffline:  # no device of dev-user is connected
            print("offline")
        run = await gw.start_run("dev-user", "stream", {"events": 3})
        async for event in gw.follow_run(run.run_id):  # resumes by itself after a drop
            print(event.seq, event.data)
        print((await gw.get_run(run.run_id)).status)  # completed


asyncio.run(main())
