"""Where a profile's files live. Standard library only: the thin CLI imports this module.

Two layouts (docs/api.md, "Socket and files"):

* ``--home DIR`` or ``AEGIS_HOME=DIR``: every file of the profile lives in DIR, the socket
  included (``DIR/aegisd.sock``), so several profiles run side by side on one machine.
* Otherwise the data lives in the XDG data directory (``$XDG_DATA_HOME/aegis``, by default
  ``~/.local/share/aegis``) and the socket is ``$XDG_RUNTIME_DIR/aegis/aegisd.sock``. When
  XDG_RUNTIME_DIR is unset (cron, su, containers without a login session) the socket falls
  back to ``/tmp/aegis-<uid>/aegisd.sock``, the way tmux does; that directory must be owned by
  the user and have mode 0700, or the daemon refuses to use it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

#: sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

SOCKET_NAME = "aegisd.sock"
DB_NAME = "aegis.db"
KEYRING_NAME = "keyring.json"
LOCK_NAME = "aegisd.lock"
PID_NAME = "aegisd.pid"
LOG_NAME = "aegisd.log"
HOME_ENV = "AEGIS_HOME"


class PathError(Exception):
    """A profile path is unusable (too long, wrong owner or mode). The message says which."""


@dataclass(frozen=True)
class ProfilePaths:
    """Every file of one profile."""

    home: Path
    socket: Path
    explicit_home: bool

    @property
    def db(self) -> Path:
        return self.home / DB_NAME

    @property
    def keyring(self) -> Path:
        return self.home / KEYRING_NAME

    @property
    def lock(self) -> Path:
        return self.home / LOCK_NAME

    @property
    def pid(self) -> Path:
        return self.home / PID_NAME

    @property
    def log(self) -> Path:
        return self.home / LOG_NAME

    def home_option(self) -> str:
        """The ``--home`` option that names this profile on a command line ('' for default)."""
        return f" --home {self.home}" if self.explicit_home else ""


def _default_data_dir() -> Path:
    # platformdirs is imported lazily to keep `aegis` start-up lean; it is pure Python.
    from platformdirs import user_data_dir

    return Path(user_data_dir("aegis", appauthor=False))


def _default_socket() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "aegis" / SOCKET_NAME
    return Path("/tmp") / f"aegis-{os.getuid()}" / SOCKET_NAME  # noqa: S108 (checked 0700)


def resolve(home: str | os.PathLike[str] | None = None) -> ProfilePaths:
    """Paths of the profile named by ``home``, else by AEGIS_HOME, else the XDG defaults."""
    if home is None or str(home) == "":
        home = os.environ.get(HOME_ENV) or None
    if home is not None:
        base = Path(home).expanduser().absolute()
        return ProfilePaths(home=base, socket=base / SOCKET_NAME, explicit_home=True)
    return ProfilePaths(home=_default_data_dir(), socket=_default_socket(), explicit_home=False)


def check_socket_path(path: Path) -> None:
    """Raise PathError when ``path`` does not fit in a Unix socket address."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise PathError(
            f"socket path {path} is {size} bytes, over the {MAX_SOCKET_PATH_BYTES}-byte limit "
            "of Unix sockets: choose a shorter --home (or XDG_RUNTIME_DIR)"
        )


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 if needed; refuse one that others can use."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise PathError(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise PathError(f"{path} belongs to another user; refusing to use it")
    if st.st_mode & 0o077:
        # Our own directory with loose permissions: tighten it rather than fail.
        os.chmod(path, 0o700)
