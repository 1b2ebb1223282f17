"""One tensor-wise merge: the plan (every header check before any data is read), the streamed passes over the
tensors, and the sinks the merged tensors go to (memory, or a folder written atomically)."""

from nbmerge.engine.plan import MergePlan, make_plan
from nbmerge.engine.progress import Progress, ProgressEvent
from nbmerge.engine.sinks import FolderSink, MemorySink
from nbmerge.engine.stream import Engine

__all__ = ["Engine", "make_plan", "MergePlan", "FolderSink", "MemorySink", "Progress", "ProgressEvent"]
