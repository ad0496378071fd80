"""Files written all-or-nothing: complete under the final name or absent, with the permissions the umask gives."""

import os

import pytest

from diffmoe_hf.atomic_files import write_text_atomically, written_atomically


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_file_is_complete_and_honours_the_umask(tmp_path, umask):
    path = str(tmp_path / "record.json")
    previous = os.umask(umask)
    try:
        write_text_atomically(path, "old")
        write_text_atomically(path, "new")
    finally:
        os.umask(previous)
    assert open(path, encoding="utf-8").read() == "new" and os.listdir(tmp_path) == ["record.json"]
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    path = str(tmp_path / "image.png")
    write_text_atomically(path, "old")
    with pytest.raises(OSError, match="disk full"), written_atomically(path, suffix=".png") as partial:
        with open(partial, "w", encoding="utf-8") as f:
            f.write("half")
        assert partial.endswith(".png") and os.path.isfile(partial)
        raise OSError("disk full")
    assert open(path, encoding="utf-8").read() == "old" and os.listdir(tmp_path) == ["image.png"]
