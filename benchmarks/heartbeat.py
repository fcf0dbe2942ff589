"""How long a peer that stops answering pings stays connected: the heartbeat's real bound.

``python -m benchmarks.heartbeat [--heartbeat 8] [--peers 8]``

Starts ``python run_gateway.py`` (embedded PostgreSQL) with
``GATEWAY_HEARTBEAT_S``, connects ``--peers`` devices spread over one heartbeat
period; each says hello and then never answers a ping (``autoping=False``) nor
sends anything. Prints one JSON line: per peer, seconds from its last frame
(the hello) to the gateway closing it, and the worst against the promised
1.5 x heartbeat. A heartbeat above 5 s shows aiohttp's rounding of its timers
to whole seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt

from benchmarks.servers import Database, start_gateway


async def silent_peer(url: str, token: str, device_id: str, delay_s: float) -> float:
    await asyncio.sleep(delay_s)
    async with aiohttp.ClientSession() as session, session.ws_connect(
        url, params={"token": token}, autoping=False, heartbeat=None,
    ) as ws:
        await ws.send_str(json.dumps({"type": "device_hello", "device_id": device_id}))
        last_frame = time.monotonic()
        while True:
            msg = await ws.receive()
            # Pings are read (to see the close) but never answered.
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                return time.monotonic() - last_frame


async def measure(heartbeat_s: float, peers: int) -> dict[str, object]:
    db = Database.open(None)
    run_dir = Path(tempfile.mkdtemp(prefix="gw-bench-hb-"))
    server = start_gateway(db, run_dir, extra_env={"GATEWAY_HEARTBEAT_S": str(heartbeat_s),
                                                   "GATEWAY_APP_PING": "false"})
    try:
        now = int(time.time())
        results = await asyncio.gather(*(
            silent_peer(server.ws_url,
                        jwt.encode({"sub": f"user-{i}", "iat": now, "exp": now + 3600},
                                   server.jwt_secret, algorithm="HS256"),
                        f"device-{i}", (heartbeat_s * i / peers + 0.137 * i) % heartbeat_s)
            for i in range(peers)))
    finally:
        server.stop()
        db.close()
    worst = max(results)
    return {"heartbeat_s": heartbeat_s, "peers": peers,
            "gone_after_s": sorted(round(r, 2) for r in results),
            "worst_s": round(worst, 2), "promised_s": 1.5 * heartbeat_s,
            "worst_over_heartbeat": round(worst / heartbeat_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heartbeat", type=float, default=8.0)
    parser.add_argument("--peers", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.heartbeat, args.peers))), flush=True)


if __name__ == "__main__":
    main()
