"""The buffer pool: buffers are reused once nothing references them, and never while a tensor still views them."""

from __future__ import annotations

import torch

from nbmerge.io.buffers import MIN_POOLED_BYTES, BufferPool

SHAPE = (512, 1024)  # 2 MiB in float32: above the pooling threshold
assert SHAPE[0] * SHAPE[1] * 4 >= MIN_POOLED_BYTES


def test_a_released_buffer_is_reused_without_new_memory():
    pool = BufferPool()
    first = pool.empty(SHAPE, torch.float32)
    pointer = first.data_ptr()
    del first
    second = pool.empty(SHAPE, torch.bfloat16)  # smaller request: served by the freed float32 buffer
    assert second.data_ptr() == pointer
    assert pool.allocated_bytes == SHAPE[0] * SHAPE[1] * 4


def test_a_buffer_still_viewed_is_never_lent_again():
    pool = BufferPool()
    held = pool.empty(SHAPE, torch.float32).fill_(1.0)
    row_view = held[3]  # a view keeps the buffer busy even once the tensor itself is gone
    del held
    other = pool.empty(SHAPE, torch.float32).fill_(2.0)
    assert other.data_ptr() != row_view.data_ptr()
    assert torch.all(row_view == 1.0)
    del other
    assert torch.all(row_view == 1.0)
    del row_view
    again = pool.empty(SHAPE, torch.float32)  # now both buffers are free: no third one is made
    assert pool.allocated_bytes == 2 * SHAPE[0] * SHAPE[1] * 4
    assert again.shape == SHAPE and again.dtype == torch.float32


def test_small_requests_are_not_pooled():
    pool = BufferPool()
    small = pool.empty((16, 16), torch.float32)
    assert small.shape == (16, 16) and pool.allocated_bytes == 0


def test_lent_tensors_are_ordinary_writable_tensors():
    pool = BufferPool()
    value = torch.randn(SHAPE)
    lent = pool.empty(SHAPE, torch.float32).copy_(value)
    assert lent.is_contiguous() and torch.equal(lent, value)
    assert torch.equal(lent.t().contiguous(), value.t().contiguous())
