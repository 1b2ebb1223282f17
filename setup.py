"""The one thing pyproject.toml cannot declare: the optional C kernels (nbmerge_plugins/native/kernels.c), loaded
with ctypes.

``optional=True``: where no C compiler is available the install still succeeds and the methods use their torch
path (``nbmerge_plugins.native.library()`` is then None). ``-ffp-contract=off``: no fused multiply-adds, so the
AVX-512, AVX2 and baseline clones of each kernel (kernels.c) round alike and a merge is bit-identical on any x86
CPU."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("nbmerge_plugins.native._kernels", ["nbmerge_plugins/native/kernels.c"],
                             extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"],
                             optional=True)])
