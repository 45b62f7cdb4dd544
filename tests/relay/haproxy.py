"""A real HAProxy (Debian's haproxy, installed by `make system-deps`) in front of relay nodes on
127.0.0.1, as contrib/relay/haproxy.cfg sets it up: TCP mode (the WebSocket passes through
untouched), health checks on /health, no log of any kind."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

CONFIG = """global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 330s
    timeout server 330s
    timeout check 1s
    retries 3
    option redispatch
frontend relay
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance leastconn
    option httpchk GET /health
{servers}
"""


class HAProxy:
    def __init__(self, tmp: Path, node_ports: list[int]) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        servers = "\n".join(
            f"    server node{i} 127.0.0.1:{p} check inter 200ms fall 1 rise 1"
            for i, p in enumerate(node_ports))
        self.config = tmp / "haproxy.cfg"
        self.config.write_text(CONFIG.format(port=self.port, servers=servers))
        self.log_path = tmp / "haproxy.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        self.url = f"http://127.0.0.1:{self.port}/v1/ws"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("haproxy exited:\n" + self.log_path.read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("haproxy did not start")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
