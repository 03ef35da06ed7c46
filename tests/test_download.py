"""The one downloader: a failed fetch is a one-line error and keeps the partial file."""

import pytest

from samliver.download import fetch_resumable, file_hash
from samliver.util import SamliverError


def test_unreachable_url_is_one_line_and_keeps_the_part(tmp_path):
    part = tmp_path / "x.bin.part"
    part.write_bytes(b"half")
    with pytest.raises(SamliverError, match="kept for resuming") as err:
        fetch_resumable("http://127.0.0.1:9/x.bin", part, progress=False, timeout=2)
    assert "\n" not in str(err.value) and part.read_bytes() == b"half"


def test_file_hash(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"abc")
    assert file_hash(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_hash(f, "md5") == "900150983cd24fb0d6963f7d28e17f72"
