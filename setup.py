"""The one thing pyproject.toml cannot declare: the optional C kernels (plugins/kernels.c), loaded with ctypes.

``optional=True``: where no C compiler is available the install still succeeds and the methods use their torch
path (``nbmerge_plugins.native.available()`` says which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("nbmerge_plugins._kernels", ["plugins/kernels.c"],
                             extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math"], optional=True)])
