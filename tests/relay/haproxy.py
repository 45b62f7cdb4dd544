"""A real HAProxy (Debian's haproxy, installed by `make system-deps`) in front of relay nodes on
127.0.0.1, configured by contrib/relay/haproxy.cfg itself: TCP mode (the WebSocket passes
through untouched), health checks on /health, no log of any kind. The test changes only what a
test must (a port of its own on 127.0.0.1 instead of TLS on 443, the nodes' ports, health
checks every 200 ms so a killed node is noticed at once, maxconn within a test's file limit),
so it fails if contrib's file breaks."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "relay" / "haproxy.cfg"
CHECK = "check inter 200ms fall 1 rise 1"


def _sub(pattern: str, repl: str, text: str, count: int = 0) -> str:
    """re.sub that insists on a match: contrib's file changed shape if it finds none."""
    new, n = re.subn(pattern, repl, text, count=count, flags=re.M)
    assert n, f"contrib/relay/haproxy.cfg no longer has {pattern!r}"
    return new


def config(port: int, node_ports: list[int]) -> str:
    text = CONTRIB.read_text()
    text = _sub(r"^\s*bind :::443 ssl .*\n", "", text)
    text = _sub(r"^(\s*)bind :443 ssl .*$", rf"\g<1>bind 127.0.0.1:{port}", text)
    # contrib's maxconn needs twice as many open files, more than a container or a user may
    # have (HAProxy then refuses to start); a test holds a few connections.
    text = _sub(r"^(\s*)maxconn \d+$", r"\g<1>maxconn 4096", text, count=1)
    m = re.search(r"^(\s*)server \S+ 127\.0\.0\.1:\d+ check.*\n", text, re.M)
    assert m, "contrib/relay/haproxy.cfg's backend lists no node"
    nodes = "".join(f"{m.group(1)}server node{i} 127.0.0.1:{p} {CHECK}\n"
                    for i, p in enumerate(node_ports))
    return _sub(r"(^\s*server \S+ 127\.0\.0\.1:\d+ check.*\n)+", nodes, text, count=1)


class HAProxy:
    def __init__(self, tmp: Path, node_ports: list[int]) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.config = tmp / "haproxy.cfg"
        self.config.write_text(config(self.port, node_ports))
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
