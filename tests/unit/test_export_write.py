"""`aegis export`'s file writing (aegis_cli/export.py write_private), on the real file
system: --force replaces whatever FILE is by the time of the rename, a failure leaves no
temporary copy of the plaintext, and while the data is written it has no name at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aegis_cli import export


class Fail(Exception):
    pass


def test_without_force_an_existing_file_is_refused(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("keep")
    with pytest.raises(Fail, match="add --force"):
        export.write_private(out, b"new", False, Fail)
    assert out.read_text() == "keep"
    export.write_private(tmp_path / "new.txt", b"new", False, Fail)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o600


def test_with_force_a_file_that_appeared_since_the_check_is_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    out.write_text("appeared")
    # the CLI's check (and any in write_private) saw nothing there: the race
    monkeypatch.setattr(Path, "exists", lambda self: False)
    monkeypatch.setattr(Path, "is_symlink", lambda self: False)
    export.write_private(out, b"secret export", True, Fail)
    assert out.read_bytes() == b"secret export" and out.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


@pytest.mark.parametrize("tmpfile", [True, False])
def test_a_directory_in_the_way_is_a_clear_failure_and_leaves_no_copy(
    tmp_path, monkeypatch, tmpfile
):
    if not tmpfile:
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)  # the named temp file's path
    (tmp_path / "out.txt").mkdir()
    monkeypatch.setattr(Path, "is_dir", lambda self: False)  # it became one after any check
    with pytest.raises(Fail, match="is a directory"):
        export.write_private(tmp_path / "out.txt", b"secret export", True, Fail)
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]  # no temporary file left


def test_while_the_data_is_written_it_has_no_name(tmp_path, monkeypatch):
    """A kill while writing (the long part) leaves no hidden plaintext copy: the file is
    O_TMPFILE's, named only for the rename."""
    if not getattr(os, "O_TMPFILE", 0):
        pytest.skip("no O_TMPFILE on this platform: the named temp file is used")
    out = tmp_path / "out.txt"
    out.write_text("old")
    seen = []
    write = export._write
    monkeypatch.setattr(export, "_write", lambda fd, data: (seen.append(
        sorted(os.listdir(tmp_path))), write(fd, data)))  # fmt: skip
    export.write_private(out, b"secret export", True, Fail)
    assert seen == [["out.txt"]] and out.read_bytes() == b"secret export"


@pytest.mark.parametrize("proc", ["none", "fd_without_links"])
def test_force_works_without_proc(tmp_path, proc):
    """Naming an O_TMPFILE file takes /proc/self/fd: without /proc (a chroot, a container)
    --force writes through the named temp file instead of failing; so it does when
    /proc/self/fd is there but linkat fails on it (a sandbox's /proc). Run for real in a mount
    namespace whose /proc is an empty tmpfs (or one holding an empty self/fd directory)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a namespace without /proc")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("cannot make a mount namespace here (user namespaces off)")
    out = tmp_path / "out.txt"
    out.write_text("old")
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        f"assert os.path.isdir('/proc/self/fd') is {proc != 'none'}\n"
        "from aegis_cli import export\n"
        "class Fail(Exception): pass\n"
        "try:\n"
        "    export.write_private(Path(sys.argv[1]), b'secret export', True, Fail)\n"
        "except Fail as exc:\n"
        "    sys.exit(f'failed: {exc}')\n"
    )
    root = Path(__file__).resolve().parents[2]
    mkdir = "" if proc == "none" else "mkdir -p /proc/self/fd &&"
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs none /proc && {mkdir} exec "$@"', "sh",
         sys.executable, "-c", script, str(out)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b"secret export" and out.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]  # no temporary file left
