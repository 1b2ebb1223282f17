"""Reading safetensors files: mapped tensors hold the file's values, never write back, and fail cleanly."""

import ctypes
import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from nbmerge.errors import ModelInputError
from nbmerge.io.mapping import map_tensor
from nbmerge.io.safetensors import read_header, read_tensor


def assert_a_source_reads_every_tensor(path, tensors):
    from nbmerge.io import sources

    source = sources.SafetensorsSource([path], "model", None)
    try:
        for name, expected in tensors.items():
            assert torch.equal(source.read(name), expected)
    finally:
        source.close()


@pytest.fixture
def stored(tmp_path):
    tensors = {"a.weight": torch.randn(300, 70), "b.bias": torch.arange(5, dtype=torch.bfloat16),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_a_mapped_tensor_holds_the_stored_values_and_matches_a_read_one(stored):
    path, tensors = stored
    entries, _ = read_header(path)
    with open(path, "rb") as f:
        for name, expected in tensors.items():
            mapped = map_tensor(f, entries[name])
            assert mapped.dtype == expected.dtype and torch.equal(mapped, expected)
            assert torch.equal(read_tensor(f, entries[name]), expected)


def test_writing_to_a_mapped_tensor_never_changes_the_file(stored):
    path, tensors = stored
    before = path.read_bytes()
    entries, _ = read_header(path)
    with open(path, "rb") as f:
        mapped = map_tensor(f, entries["a.weight"])
        mapped.mul_(0)  # a private mapping: the page is copied on write
        assert float(mapped.abs().sum()) == 0
        assert torch.equal(map_tensor(f, entries["a.weight"]), tensors["a.weight"])
    assert path.read_bytes() == before


def test_a_file_truncated_after_its_header_was_read_is_reported(stored):
    path, _ = stored
    entries, _ = read_header(path)
    with open(path, "rb") as f:
        os.truncate(path, entries["a.weight"].start + 10)
        with pytest.raises(ModelInputError, match=r"model.safetensors: file ended inside a tensor"):
            map_tensor(f, entries["a.weight"])


def test_a_source_whose_files_cannot_be_mapped_reads_them_instead(stored, monkeypatch):
    from nbmerge.io import sources

    path, tensors = stored

    def unmappable(file, entry):
        raise OSError("no mmap on this file system")

    monkeypatch.setattr(sources, "map_tensor", unmappable)
    assert_a_source_reads_every_tensor(path, tensors)


def test_where_the_kernel_cannot_populate_a_mapping_its_pages_are_read_in_instead(stored, monkeypatch):
    """Kernels older than Linux 5.14 refuse MADV_POPULATE_READ; the pages are then faulted in by reading them."""
    from nbmerge.io import mapping

    asked = []

    def refusing_madvise(address, length, advice):
        asked.append(advice)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(mapping, "_MADVISE", refusing_madvise)
    path, tensors = stored
    entries, _ = read_header(path)
    with open(path, "rb") as f:
        for name in ("a.weight", "b.bias"):
            assert torch.equal(map_tensor(f, entries[name]), tensors[name])
    assert asked == [mapping._MADV_POPULATE_READ] * 2


def test_mapped_tensors_are_populated_without_holding_the_gil():
    """mmap.madvise keeps the GIL through a populate that may wait for the disk; libc's, through ctypes, lets
    it go (so the merge's own threads run meanwhile)."""
    from nbmerge.io import mapping

    assert mapping._MADVISE is not None and mapping._MADVISE.__class__.__module__ == "ctypes"


def test_a_mapping_whose_pages_cannot_be_read_is_read_with_preadv_instead(stored, monkeypatch):
    """An I/O error while populating is never left to fault inside a kernel: the source reads the tensor."""
    from nbmerge.io import mapping

    def failing_madvise(address, length, advice):
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(mapping, "_MADVISE", failing_madvise)
    path, tensors = stored
    entries, _ = read_header(path)
    with open(path, "rb") as f, pytest.raises(OSError, match="populating a mapped tensor"):
        map_tensor(f, entries["a.weight"])
    assert_a_source_reads_every_tensor(path, tensors)
