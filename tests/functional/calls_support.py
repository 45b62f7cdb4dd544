"""Helpers of the call tests: a tone, its analysis, a traffic-recording proxy in front of the
relay, a real coturn on 127.0.0.1, and what /proc says about a daemon's sockets and libraries."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# What must never reach the relay, the event stream or the history in the clear.
# Each needle is long enough (>= 6 bytes) not to turn up by chance in megabytes of ciphertext
# (a 3-byte "v=0" does, about once per 16 MiB).
SDP_NEEDLES = [b"v=0\r\no=", b"a=fingerprint", b"candidate", b"typ host", b"typ relay", b"sha-256",
               b"ice-ufrag", b"ice-pwd", b"IN IP4", b"m=audio"]  # fmt: skip


def write_tone(path: Path, hz: float, seconds: float, rate: int = 48000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        n = int(rate * seconds)
        w.writeframes(
            b"".join(
                struct.pack("<h", int(12000 * math.sin(2 * math.pi * hz * i / rate)))
                for i in range(n)
            )
        )


def analyse(path: Path) -> tuple[float, float]:
    """(duration in seconds, dominant frequency in Hz) of a 16-bit WAV file."""
    with wave.open(str(path), "rb") as w:
        rate, channels, n = w.getframerate(), w.getnchannels(), w.getnframes()
        assert w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(n), dtype="<i2").astype(np.float64)
    mono = data.reshape(-1, channels).mean(axis=1)
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    spectrum[0] = 0
    freqs = np.fft.rfftfreq(len(mono), 1 / rate)
    return n / rate, float(freqs[int(np.argmax(spectrum))])


def udp_sockets(pid: int) -> list[str]:
    """The local addresses (ip:port) of the UDP sockets process `pid` holds."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table, v6 in (("udp", False), ("udp6", True)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[9] not in inodes:
                    continue
                ip_hex, port_hex = cols[1].split(":")
                raw = bytes.fromhex(ip_hex)
                if v6:
                    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                    ip = socket.inet_ntop(socket.AF_INET6, b"".join(words))
                else:
                    ip = socket.inet_ntoa(raw[::-1])
                out.append(f"{ip}:{int(port_hex, 16)}")
    return out


def open_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def media_libraries_mapped(pid: int) -> list[str]:
    """Shared libraries of aiortc's media stack (FFmpeg via PyAV, libsrtp, opus, vpx) mapped
    into process `pid`."""
    text = Path(f"/proc/{pid}/maps").read_text()
    marks = ("libavcodec", "libavformat", "/av/", "pylibsrtp", "libopus", "libvpx")
    return sorted({m for m in marks if m in text})


def dump(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def sdp_leaks(data: bytes) -> list[str]:
    return [n.decode() for n in SDP_NEEDLES if n in data]


class RecordingProxy:
    """A TCP forwarder in front of the relay that keeps every byte either way: what the relay
    (or anyone on its link) sees of the daemons' traffic."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.streams: list[bytearray] = []
        self._lock = threading.Lock()
        self._closed = False
        self._flowing = threading.Event()  # cleared: bytes are held (in order) until resume()
        self._flowing.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the relay is gone (the test stopped it): refuse this one
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                buf = bytearray()
                with self._lock:
                    self.streams.append(buf)
                threading.Thread(target=self._pump, args=(a, b, buf), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while data := src.recv(65536):
                buf.extend(data)
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def pause(self) -> None:
        """Hold everything either way (for a few seconds at most: the links' heartbeats)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def payload_bytes(self) -> list[bytes]:
        """Each stream after its HTTP upgrade (whose Host header names 127.0.0.1 anyway)."""
        with self._lock:
            return [bytes(b).partition(b"\r\n\r\n")[2] for b in self.streams]

    def frames(self) -> list[bytes]:
        """Every WebSocket frame's payload either way, unmasked (a client's frames are masked
        on the wire; the relay reads them unmasked): what the relay itself receives and sends."""
        out: list[bytes] = []
        for stream in self.payload_bytes():
            out.extend(_ws_payloads(stream))
        return out

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self.sock.close()


def _ws_payloads(data: bytes) -> list[bytes]:
    """The payloads of the complete RFC 6455 frames in ``data`` (a partial last one is left)."""
    out, i = [], 0
    while i + 2 <= len(data):
        masked, n = data[i + 1] & 0x80, data[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            n, j = int.from_bytes(data[j : j + 2], "big"), j + 2
        elif n == 127:
            n, j = int.from_bytes(data[j : j + 8], "big"), j + 8
        key = data[j : j + 4] if masked else b""
        j += 4 if masked else 0
        if j + n > len(data):
            break
        body = data[j : j + n]
        if masked:
            body = bytes(b ^ key[k % 4] for k, b in enumerate(body))
        out.append(body)
        i = j + n
    return out


class Coturn:
    """A real coturn (Debian's `turnserver`) on 127.0.0.1 with long-term credentials."""

    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("turnserver") or (
            "/usr/bin/turnserver" if os.path.exists("/usr/bin/turnserver") else None
        )
        if exe is None:
            raise AssertionError(
                "turnserver (Debian package coturn) is not installed: run `make system-deps` "
                "as root, or apt-get install coturn"
            )
        self.user, self.password = "aegis-test", os.urandom(12).hex()
        self.realm = "aegis.test"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tmp / "turnserver.log"
        # coturn takes static users from its command line (its config file's user= lines were
        # not honoured here); the password is random and lives as long as this test server.
        args = [exe, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
                f"--listening-port={self.port}", "--min-port=49152", "--max-port=65535",
                "--lt-cred-mech", f"--realm={self.realm}", f"--user={self.user}:{self.password}",
                "--allow-loopback-peers",
                "--no-tls", "--no-dtls", "--no-cli", "--no-tcp-relay", "--no-multicast-peers",
                f"--log-file={self.log}", "--simple-log", "--verbose", "--no-stdout-log",
                f"--pidfile={tmp / 'turnserver.pid'}", "--userdb", str(tmp / "turndb")]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"turnserver exited:\n{self.log_text()}")
            if f"0100007F:{self.port:04X}" in Path("/proc/net/udp").read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"turnserver did not start:\n{self.log_text()}")

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log.read_text(errors="replace")
        return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def coturn(tmp: Path) -> Iterator[Coturn]:
    server = Coturn(tmp)
    try:
        yield server
    finally:
        server.close()
