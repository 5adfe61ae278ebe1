"""Builds the one compiled extension, fastproxy._core.

The core is required: a build without a C compiler or Cython fails here instead of
installing a slow pure-Python fallback.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTPROXY_DEBUG_BUILD") == "1"

extensions = [
    Extension(
        "fastproxy._core",
        ["fastproxy/_core.pyx"],
        extra_compile_args=["-O2"] + (["-O0", "-g"] if DEBUG else []),
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        # core/*.pyx for `include`; includes/*.pxd (C APIs: atomics) for `from includes.x cimport`
        include_path=["fastproxy"],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        annotate=os.environ.get("FASTPROXY_ANNOTATE") == "1",
    ),
)
