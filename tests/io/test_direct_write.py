"""Direct (O_DIRECT) file writes: the bytes on disk are exactly the bytes written, whatever the sizes, and the
writer falls back to the page cache where the file system refuses direct I/O."""

import errno
import fcntl
import os

import pytest
import torch

from nbmerge.errors import OutputWriteError
from nbmerge.io import direct_write
from nbmerge.io.direct_write import DIRECT_IO_BLOCK, STAGE, DirectFile


def _supports_direct_io(folder) -> bool:
    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return hasattr(os, "O_DIRECT")


def _pieces(total: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (total,), dtype=torch.uint8, generator=generator)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(data[start:start + size])
        start += size
    pieces.append(data[start:])
    return pieces


@pytest.mark.parametrize("sizes", [
    [0],                                   # nothing but one tail piece
    [1, DIRECT_IO_BLOCK - 1],                    # a file shorter than one block
    [STAGE - 3, 3],                        # exactly one stage
    [STAGE, 1],                            # one stage and a byte
    [DIRECT_IO_BLOCK + 7, 2 * STAGE + 11, 5],    # pieces straddling stage boundaries
    [3 * STAGE + 1],                       # one piece over several stages (the writer waits for a free stage)
])
def test_the_file_holds_exactly_the_bytes_written(tmp_path, sizes):
    total = sum(sizes) + 4099
    pieces = _pieces(total, sizes, seed=len(sizes))
    path = tmp_path / "out.bin"
    writer = DirectFile(path)
    writer.write(b"header:")
    for piece in pieces:
        writer.write(piece)
    writer.close()
    expected = b"header:" + torch.cat(pieces).numpy().tobytes()
    assert path.stat().st_size == len(expected)
    assert path.read_bytes() == expected
    if _supports_direct_io(tmp_path):
        assert writer.direct  # the test exercised the O_DIRECT path, not the fallback


def test_tensors_of_any_dtype_are_written_as_stored_little_endian_bytes(tmp_path):
    tensors = [torch.randn(1000, 37), torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t(),
               torch.tensor([True, False]), torch.zeros(0, 5)]
    path = tmp_path / "out.bin"
    writer = DirectFile(path)
    for tensor in tensors:
        writer.write(tensor)
    writer.close()
    expected = b"".join(t.contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                        else t.contiguous().view(torch.int16).numpy().tobytes() for t in tensors)
    assert path.read_bytes() == expected


def test_a_file_system_refusing_o_direct_at_open_gets_page_cache_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & direct_write._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_write.os, "open", refusing_open)
    data = torch.randint(0, 256, (STAGE + 12345,), dtype=torch.uint8)
    writer = DirectFile(tmp_path / "out.bin")
    writer.write(data)
    writer.close()
    assert not writer.direct
    assert (tmp_path / "out.bin").read_bytes() == data.numpy().tobytes()


def test_a_device_refusing_the_alignment_mid_file_switches_to_page_cache_writes(tmp_path, monkeypatch):
    if not _supports_direct_io(tmp_path):
        pytest.skip("this file system has no O_DIRECT, so there is no direct write to refuse")
    real_pwrite, refused = os.pwrite, []

    def pwrite_refusing_direct_once(fd, data, offset):  # as a device whose blocks are larger than DIRECT_IO_BLOCK
        if not refused and offset == STAGE and fcntl.fcntl(fd, fcntl.F_GETFL) & direct_write._O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite_refusing_direct_once)
    data = torch.randint(0, 256, (2 * STAGE + 999,), dtype=torch.uint8)
    writer = DirectFile(tmp_path / "out.bin")
    writer.write(data)
    writer.close()
    assert refused == [STAGE] and not writer.direct
    assert (tmp_path / "out.bin").read_bytes() == data.numpy().tobytes()


def test_the_environment_can_turn_direct_writes_off(tmp_path, monkeypatch):
    monkeypatch.setenv("NBMERGE_DIRECT_WRITE", "0")
    writer = DirectFile(tmp_path / "out.bin")
    writer.write(b"abc")
    writer.close()
    assert not writer.direct and (tmp_path / "out.bin").read_bytes() == b"abc"


def test_a_failed_write_is_raised_naming_the_file_not_swallowed(tmp_path, monkeypatch):
    def failing_pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_write.os, "pwrite", failing_pwrite)
    writer = DirectFile(tmp_path / "out.bin")
    with pytest.raises(OutputWriteError, match=r"out\.bin: writing the output failed \(No space left on device\)"):
        writer.write(torch.zeros(3 * STAGE, dtype=torch.uint8))  # the third stage waits on the failed first
        writer.close()
    writer.abort()
    assert writer.fd == -1


def _page_aligned(values: torch.Tensor) -> torch.Tensor:
    """A copy of ``values`` in page-aligned memory, as the engine's pooled buffers are."""
    import mmap

    raw = torch.frombuffer(mmap.mmap(-1, values.numel() * values.element_size()), dtype=values.dtype)
    return raw.view(values.shape).copy_(values) if values.numel() else raw


def test_aligned_pieces_go_to_the_disk_from_their_own_memory_and_the_rest_is_staged(tmp_path):
    if not _supports_direct_io(tmp_path):
        pytest.skip("this file system has no O_DIRECT: everything is written through the page cache")
    generator = torch.Generator().manual_seed(3)
    header = b"{" + b" " * (DIRECT_IO_BLOCK - 2) + b"}"                      # a block, like ShardWriter's padded header
    big = _page_aligned(torch.randn(3 * STAGE // 4, generator=generator))   # whole blocks, page-aligned
    odd = _page_aligned(torch.randn(1001, generator=generator))             # leaves the file unaligned
    after = _page_aligned(torch.randn(DIRECT_IO_BLOCK, generator=generator))      # aligned memory, unaligned offset
    writer = DirectFile(tmp_path / "out.bin")
    writer.write(header)
    writer.write(big)
    assert writer._allocated == 1 and writer._filled == 0  # the header was staged, the tensor not copied
    writer.write(odd)
    writer.write(after)
    assert writer._in_flight_bytes <= direct_write.IN_FLIGHT_BYTES
    writer.close()
    expected = header + b"".join(t.numpy().tobytes() for t in (big, odd, after))
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_what_waits_for_the_disk_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_write, "IN_FLIGHT_BYTES", 3 * DIRECT_IO_BLOCK)
    writer = DirectFile(tmp_path / "out.bin")
    pieces = [_page_aligned(torch.full((DIRECT_IO_BLOCK // 4,), float(i))) for i in range(10)]
    for piece in pieces:
        writer.write(piece)
        assert writer._in_flight_bytes <= 3 * DIRECT_IO_BLOCK
    writer.close()
    assert (tmp_path / "out.bin").read_bytes() == b"".join(p.numpy().tobytes() for p in pieces)
