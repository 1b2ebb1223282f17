"""What a plugin author imports: the declaration of a merge method and what its kernel receives.

``from nbmerge.method import MergeMethod, TensorJob, Param`` is the whole contract of a tensor-wise method; a
module-building method adds ``ModuleJob``, ``BuiltModule`` and ``UnlabeledTask``. ``tensor_names`` tells what a
tensor is from its name (layer index, embedding, attention, ...). Nothing here opens files or imports the engine.
"""

from nbmerge.method.declaration import (
                                         BASE_OPTIONAL,
                                         BASE_REQUIRED,
                                         BASE_UNUSED,
                                         BuiltModule,
                                         MergeMethod,
                                         ModuleJob,
                                         Stage,
                                         TensorJob,
                                         UnlabeledTask,
                                         check_fits,
)
from nbmerge.method.params import Param, schedule_value

__all__ = ["MergeMethod", "TensorJob", "Stage", "ModuleJob", "BuiltModule", "UnlabeledTask", "Param",
           "BASE_REQUIRED", "BASE_OPTIONAL", "BASE_UNUSED", "check_fits", "schedule_value"]
