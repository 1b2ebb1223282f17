"""Bytes on disk to tensors and back, with no merge logic: model inputs opened for streaming, the safetensors
format read and written directly, O_DIRECT output files, reusable CPU buffers, and trained-state files."""

from nbmerge.io.buffers import BufferPool
from nbmerge.io.direct_write import DirectFile
from nbmerge.io.safetensors import ShardWriter, read_header
from nbmerge.io.sources import ModelSource, TensorInfo, open_model

__all__ = ["open_model", "ModelSource", "TensorInfo", "read_header", "ShardWriter", "DirectFile", "BufferPool"]
