"""io.regular: regular files only, inside the checkpoint, checked before anything is opened (real FIFOs, sockets, links)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from shardfix.errors import BadInputError
from shardfix.io.regular import check_regular, open_regular, scan_checkpoint


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f.pt")
    with pytest.raises(BadInputError, match="FIFO"):
        open_regular(tmp_path / "f.pt")
    with pytest.raises(BadInputError, match="f.pt"):
        scan_checkpoint(tmp_path)


def test_socket_and_device_refused(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "s.distcp"))
        with pytest.raises(BadInputError, match="socket"):
            scan_checkpoint(tmp_path)
    finally:
        s.close()
    with pytest.raises(BadInputError, match="character device"):
        check_regular("/dev/zero")


def test_links(tmp_path: Path) -> None:
    ck, out = tmp_path / "ck", tmp_path / "out"
    (ck / "sub").mkdir(parents=True)
    out.mkdir()
    (out / "x.pt").write_bytes(b"x")
    (ck / "sub" / "y.pt").write_bytes(b"y")
    (ck / "in.pt").symlink_to(ck / "sub" / "y.pt")
    assert scan_checkpoint(ck) == []
    (ck / "dirlink").symlink_to(out)
    with pytest.raises(BadInputError, match="dirlink.*outside the checkpoint"):
        scan_checkpoint(ck)
    notes = scan_checkpoint(ck, follow_symlinks=True)
    assert len(notes) == 1 and str(out) in notes[0]
    (ck / "broken.pt").symlink_to(tmp_path / "nothing")
    with pytest.raises(BadInputError, match="broken"):
        scan_checkpoint(ck, follow_symlinks=True)


def test_named_link_to_a_file_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real.pt").write_bytes(b"x")
    (tmp_path / "named.pt").symlink_to(tmp_path / "real.pt")
    assert scan_checkpoint(tmp_path / "named.pt") == []
    fd = open_regular(tmp_path / "named.pt")
    try:
        assert os.read(fd, 1) == b"x"
    finally:
        os.close(fd)
