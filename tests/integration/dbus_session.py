# ruff: noqa: F722, F821
# No `from __future__ import annotations` here: dbus-fast reads the D-Bus signatures from the
# method annotations ('s', 'a{sv}', ...) as written.
"""A real session bus (dbus-daemon, started here with its own configuration) and a small
notification server on it that records the Notify calls it receives."""

import asyncio
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from dbus_fast import DBusError, ErrorType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

DBUS_DAEMON = shutil.which("dbus-daemon")
SKIP_REASON = (
    "dbus-daemon is not installed (Debian package 'dbus'; .ci/run installs it): "
    "apt-get install dbus"
)


class SessionBus:
    """dbus-daemon --session-like bus on a socket under ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        assert DBUS_DAEMON is not None
        self.socket = tmp / "bus"
        conf = tmp / "session.conf"
        conf.write_text(CONFIG.format(socket=self.socket))
        self.proc = subprocess.Popen(
            [DBUS_DAEMON, f"--config-file={conf}", "--print-address", "--nofork"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("unix:"), self.proc.stderr.read() if self.proc.stderr else ""

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class Notifications(ServiceInterface):
    def __init__(self, capabilities: tuple[str, ...] = ("body",)) -> None:
        super().__init__("org.freedesktop.Notifications")
        self.capabilities = list(capabilities)
        self.calls: list[dict[str, Any]] = []
        self.closed: list[int] = []  # CloseNotification's ids
        self.lock = threading.Lock()

    @method()
    def Notify(
        self,
        app_name: "s",
        replaces_id: "u",
        app_icon: "s",
        summary: "s",
        body: "s",
        actions: "as",
        hints: "a{sv}",
        expire_timeout: "i",
    ) -> "u":
        with self.lock:
            self.calls.append(
                {
                    "app_name": app_name,
                    "summary": summary,
                    "body": body,
                    "category": hints["category"].value if "category" in hints else None,
                    "expire_timeout": expire_timeout,
                }
            )
            return len(self.calls)

    @method()
    def GetCapabilities(self) -> "as":
        if self.capabilities == ["(fail)"]:  # a server whose GetCapabilities fails
            raise DBusError(ErrorType.FAILED, "no capabilities today")
        return self.capabilities

    @method()
    def GetServerInformation(self) -> "ssss":
        return ["test-server", "AegisLink tests", "1", "1.2"]

    @method()
    def CloseNotification(self, id: "u") -> None:
        with self.lock:
            self.closed.append(id)

    def recorded(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.calls)


class NotificationServer:
    """Notifications on ``address``, served from a thread with its own event loop."""

    def __init__(self, address: str, capabilities: tuple[str, ...] = ("body",)) -> None:
        self.address = address
        self.iface = Notifications(capabilities)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "the notification server did not start"
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop = self._loop.create_future()
            bus = await MessageBus(bus_address=self.address).connect()
            bus.export("/org/freedesktop/Notifications", self.iface)
            await bus.request_name("org.freedesktop.Notifications")
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        await self._stop
        bus.disconnect()

    def calls(self) -> list[dict[str, Any]]:
        return self.iface.recorded()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(
                lambda: self._stop.done() or self._stop.set_result(None)  # type: ignore[union-attr]
            )
        self._thread.join(10)
