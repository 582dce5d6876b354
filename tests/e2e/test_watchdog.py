"""The systemd watchdog reflects the daemon's own liveness: a wedged agent stops the pings.

The daemon runs in-process here (a real broker, a real notify socket, the embedded SQLite
database) so that one agent can be wedged: its ``handle`` replaced by one that never
returns, as a bug or a hung call would. Everything else is the real supervisor.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.supervisor import Supervisor
from daemon.wiring import prepare_schema
from tests.harness.daemon import publish_all
from tests.harness.servers import Mosquitto, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

INTERVAL_USEC = 200_000  # WATCHDOG_USEC: the daemon pings every half of it, 0.1 s
STALL_SECONDS = 1.0


async def next_message(listener: socket.socket, within: float) -> str | None:
    """The next datagram on the notify socket, or None when none comes ``within`` seconds."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            return (await loop.sock_recv(listener, 4096)).decode()
    except TimeoutError:
        return None


async def test_a_wedged_agent_stops_the_watchdog_pings_and_recovery_resumes_them(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(address))
    listener.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    monkeypatch.setenv("WATCHDOG_USEC", str(INTERVAL_USEC))
    config = load_config(
        None,
        mqtt={"url": mosquitto.url, "client_id": "ingestd-watchdog-test"},
        metrics={"listen": f"127.0.0.1:{free_port()}"},
        daemon={"state_dir": str(tmp_path / "state"), "stall_timeout_seconds": STALL_SECONDS},
    )
    assert await asyncio.to_thread(prepare_schema, config) is None
    supervisor = Supervisor(config)
    unwedge = asyncio.Event()
    real_handle = supervisor.daemon.enrichment.handle

    async def wedged(batch: list[object]) -> None:
        await unwedge.wait()  # a bug, a call that never returns
        await real_handle(batch)  # type: ignore[arg-type]

    monkeypatch.setattr(supervisor.daemon.enrichment, "handle", wedged)
    run = asyncio.create_task(supervisor.run(install_signal_handlers=False))
    try:
        ready = await next_message(listener, 20)
        assert ready is not None
        assert ready.startswith("READY=1")
        assert await next_message(listener, 2) == "WATCHDOG=1"
        assert await next_message(listener, 2) == "WATCHDOG=1"  # periodic

        # Idle, the wedge harms nothing: no work, no stall. Then work arrives and sits.
        await asyncio.to_thread(publish_all, mosquitto.port, [("sensors/d1/t", b'{"value": 1}')])
        async with asyncio.timeout(10):  # pings go on until the stall timeout has passed ...
            while await next_message(listener, 2) == "WATCHDOG=1":
                pass
        # ... then stop for good: several intervals in a row without a ping.
        assert await next_message(listener, 5 * INTERVAL_USEC / 1e6) is None
        assert not supervisor.live()

        unwedge.set()  # the agent makes progress again: so do the pings
        assert await next_message(listener, 5) == "WATCHDOG=1"
        assert supervisor.live()
        supervisor.request_stop()
        async with asyncio.timeout(15):
            while (message := await next_message(listener, 15)) != "STOPPING=1":
                assert message is not None, "no STOPPING=1"
        await asyncio.wait_for(run, 15)
        assert supervisor.metrics.pipeline.stored == 1  # the held message was stored after all
    finally:
        run.cancel()
        listener.close()
