"""Build script for the optional compiled extension (the Cython fallback in kernels/).

All metadata lives in pyproject.toml. The Cython backend is not built yet: until it is,
this installs the pure-Python package (whose kernels Numba compiles at run time).
"""

from setuptools import setup

setup()
