"""The optional compiled kernels, built at install time (everything else is in pyproject.toml).

Two plain C shared libraries (no Python API; the library calls them through ctypes): the fused attention
pass (``attend/_fused.py``) with the certificate's projections on the store writer's thread
(``record/sketch.py``), and HDF5's Fletcher-32 checksum (``store/_fletcher.py``). A build that fails
(no C compiler, no OpenMP) does not fail the install: the library then uses torch ops and h5py, which give
the same answers. ``LIGHTNING_DUALFORM_BUILD_KERNELS=0`` skips the build.
"""

import os
import sys

from setuptools import Extension, setup

if os.environ.get("LIGHTNING_DUALFORM_BUILD_KERNELS", "1").lower() in ("0", "false", "no", "off"):
    kernels = []
else:
    msvc = sys.platform == "win32"
    optimise = ["/O2"] if msvc else ["-O3"]
    openmp = (["/openmp"], []) if msvc else (["-fopenmp"], ["-fopenmp"])
    kernels = [
        Extension("lightning_dualform._kernels.fused", ["src/lightning_dualform/_kernels/fused.c"],
                  depends=["src/lightning_dualform/_kernels/fused_body.h"],
                  extra_compile_args=optimise + openmp[0], extra_link_args=openmp[1], optional=True),
        Extension("lightning_dualform._kernels.fletcher32", ["src/lightning_dualform/_kernels/fletcher32.c"],
                  extra_compile_args=optimise, optional=True),
    ]

setup(ext_modules=kernels)
