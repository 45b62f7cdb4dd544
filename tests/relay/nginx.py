"""A real nginx (Debian's nginx, installed by `make system-deps`) in front of relay nodes on
127.0.0.1, configured by contrib/relay/nginx.conf itself: the test takes that file and changes
only what a test must (a port of its own instead of TLS on 443, the nodes' ports in its
upstream), so the test fails if contrib's upstream, WebSocket or logging settings break. nginx
runs without root: its prefix, pid file, temporary directories and startup error log (`-e`) are
in a temporary directory; as root its workers run as `nobody`."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib" / "relay" / "nginx.conf"

MAIN = """daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
{user}
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {prefix}/aegis-relay.conf;
}}
"""


def _sub(pattern: str, repl: str, text: str, count: int = 0) -> str:
    """re.sub that insists on a match: contrib's file changed shape if it finds none."""
    new, n = re.subn(pattern, repl, text, count=count, flags=re.M)
    assert n, f"contrib/relay/nginx.conf no longer has {pattern!r}"
    return new


def server_config(port: int, node_ports: list[int]) -> str:
    """contrib/relay/nginx.conf for this test: plain HTTP on 127.0.0.1:`port`, these nodes."""
    text = CONTRIB.read_text()
    text = _sub(r"^\s*listen \[::\]:443 ssl;\n", "", text)
    text = _sub(r"^(\s*)listen 443 ssl;", rf"\g<1>listen 127.0.0.1:{port};", text)
    text = _sub(r"^\s*ssl_\w+ .*;\n", "", text)
    m = re.search(r"^(\s*)server 127\.0\.0\.1:\d+( [^;\n]*)?;\n", text, re.M)
    assert m, "contrib/relay/nginx.conf's upstream lists no node"
    nodes = "".join(f"{m.group(1)}server 127.0.0.1:{p}{m.group(2) or ''};\n"
                    for p in node_ports)
    text = _sub(r"(^\s*server 127\.0\.0\.1:\d+[^;\n]*;\n)+", nodes.replace("\\", r"\\"), text,
                count=1)
    return text


class Nginx:
    def __init__(self, node_ports: list[int]) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(binary):
            raise FileNotFoundError("nginx (Debian: nginx; make system-deps, as root)")
        # Not under pytest's tmp_path: as root the workers run as nobody, who may not enter it.
        self.prefix = Path(tempfile.mkdtemp(prefix="aegis-nginx-"))
        (self.prefix / "tmp").mkdir()
        user = ""
        if os.geteuid() == 0:
            user = "user nobody nogroup;"
            os.chmod(self.prefix, 0o755)
            shutil.chown(self.prefix / "tmp", "nobody", "nogroup")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        (self.prefix / "aegis-relay.conf").write_text(server_config(self.port, node_ports))
        self.config = self.prefix / "nginx.conf"
        self.config.write_text(MAIN.format(prefix=self.prefix, user=user))
        self.log_path = self.prefix / "error.log"  # nginx's own, before contrib's takes over
        self.output_path = self.prefix / "output.log"
        out = open(self.output_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.prefix), "-c", str(self.config), "-e", str(self.log_path)],
            stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.url = f"http://127.0.0.1:{self.port}/v1/ws"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited:\n" + self.output())
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start:\n" + self.output())

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.output_path, self.log_path)
                       if p.exists())

    def files(self) -> list[Path]:
        """Every file nginx has written (its logs, should it keep any)."""
        return [p for p in self.prefix.rglob("*") if p.is_file()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.prefix, ignore_errors=True)
