import os

import pytest

from nbmerge.io.text_files import write_text_atomically


def test_a_text_output_is_replaced_whole(tmp_path):
    path = tmp_path / "best.yml"
    path.write_text("old: 1\n")
    write_text_atomically(path, "merge_method: ties\n" * 1000)
    assert path.read_text() == "merge_method: ties\n" * 1000
    assert os.listdir(tmp_path) == ["best.yml"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_partial_sibling(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text('{"rows": []}')
    # the first 100 000 characters encode, then a lone surrogate cannot: the write fails after part of it is out
    with pytest.raises(UnicodeEncodeError):
        write_text_atomically(path, "x" * 100_000 + "\ud800")
    assert path.read_text() == '{"rows": []}'
    assert os.listdir(tmp_path) == ["bench.json"]
