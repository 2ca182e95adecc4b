"""Build script for the optional compiled extension ``fastxent._cy_xent`` (kernels/_cy_xent.pyx).

All metadata lives in pyproject.toml; this file only adds the extension and says how it
is skipped. ``FASTXENT_BUILD_EXT`` decides:

- ``auto`` (default): try to build it; if Cython or a working C compiler is missing, or
  the build fails, install the pure-Python package (whose kernels Numba compiles at run
  time) and print why. This is markupsafe's ``BuildFailed`` retry.
- ``1``: the extension must build, else the install fails.
- ``0``: do not build it.

Compiler flags (GCC/Clang): ``-O3`` so that the loops vectorise, ``-g0`` (no debug info: 5x smaller), and
``-fno-trapping-math``, without which gcc will not if-convert the exponential's selects
and vectorises nothing; no ``-ffast-math`` (it would drop inf/NaN semantics and fold the
exponential's rounding trick). No ``-march=native``: a distributed binary must run on any
x86-64. Instead, when the compiler builds and links ``target_clones`` (GCC >= 12,
x86-64 Linux with glibc), the hot functions are multiversioned for x86-64-v4 (AVX-512),
x86-64-v3 (AVX2 + FMA) and the SSE2 baseline, picked at load time
(kernels/_cy_xent_simd.h). OpenMP is used when ``-fopenmp`` compiles and links a test
program; otherwise the kernels run on one thread, and the build says so.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

BUILD_EXT_ENV = "FASTXENT_BUILD_EXT"


class BuildFailed(Exception):
    """The optional extension could not be built (the message says why)."""


def _say(message: str) -> None:
    print(f"fastxent setup: {message}", file=sys.stderr, flush=True)


OPENMP_PROBE = r"""
#include <omp.h>
int fx_probe(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n + omp_get_max_threads();
}
"""

MULTIVERSION_PROBE = r"""
#if !defined(__GNUC__) || defined(__clang__) || !defined(__x86_64__) || __GNUC__ < 12
#error "target_clones with arch=x86-64-v4 needs GCC >= 12 on x86-64"
#endif
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static float fx_sum(const float *x, long n) { float s = 0; for (long i = 0; i < n; i++) s += x[i]; return s; }
float fx_probe(const float *x, long n) { return fx_sum(x, n) + (__builtin_cpu_supports("x86-64-v4") ? 1 : 0); }
"""


def _compiles_and_links(compiler, code: str, compile_args: list[str], link_args: list[str]) -> str | None:
    """None if ``code`` compiles and links as a shared object with these flags, else why not."""
    tmp = tempfile.mkdtemp(prefix="fastxent-probe-")
    try:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(code)
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=compile_args)
            compiler.link_shared_object(objects, os.path.join(tmp, "probe.so"), extra_postargs=link_args)
        except (CCompilerError, CompileError, LinkError, ExecError) as error:
            return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OptionalBuildExt(build_ext):
    """build_ext that probes OpenMP and multiversioning, and turns any failure into BuildFailed."""

    def run(self):
        try:
            super().run()
        except (PlatformError, FileNotFoundError) as error:
            raise BuildFailed(f"no usable C compiler ({error})") from error

    def build_extensions(self):
        compiler = self.compiler
        if compiler.compiler_type == "msvc":
            base, openmp = ["/O2"], (["/openmp"], [])
        else:
            base, openmp = ["-O3", "-fno-trapping-math", "-g0"], (["-fopenmp"], ["-fopenmp"])
        compile_args, link_args, macros = list(base), [], []

        why_not = _compiles_and_links(compiler, OPENMP_PROBE, openmp[0], openmp[1])
        if why_not is None:
            compile_args += openmp[0]
            link_args += openmp[1]
            _say(f"OpenMP: yes ({' '.join(openmp[0])})")
        else:
            _say(f"OpenMP: NO, the Cython kernels will run on one thread ({' '.join(openmp[0])} failed: {why_not})")

        glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"  # ifunc needs glibc's loader
        why_not = "not x86-64 Linux with glibc"
        if glibc and platform.machine() in ("x86_64", "AMD64") and compiler.compiler_type == "unix":
            why_not = _compiles_and_links(compiler, MULTIVERSION_PROBE, compile_args, link_args)
        if why_not is None:
            macros.append(("FASTXENT_MULTIVERSION", "1"))
            _say("multiversioning: x86-64-v4 (AVX-512), x86-64-v3 (AVX2), baseline, picked at load time")
        else:
            _say(f"multiversioning: no, baseline ISA only ({why_not})")

        for ext in self.extensions:
            ext.extra_compile_args = compile_args + list(ext.extra_compile_args)
            ext.extra_link_args = link_args + list(ext.extra_link_args)
            ext.define_macros = macros + list(ext.define_macros)
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, LinkError, ExecError, PlatformError, ValueError) as error:
            raise BuildFailed(f"compiling {ext.name} failed ({error})") from error


def _extensions() -> list[Extension]:
    """The Cython extension, cythonized here (raises BuildFailed without Cython)."""
    try:
        from Cython.Build import cythonize
    except ImportError as error:
        raise BuildFailed(f"Cython is not installed ({error})") from error
    extension = Extension("fastxent._cy_xent", sources=["kernels/_cy_xent.pyx"], include_dirs=["kernels"])
    try:
        return cythonize([extension], compiler_directives={"language_level": 3}, quiet=True)
    except Exception as error:  # a Cython compile error: report it, as for a C compiler error
        raise BuildFailed(f"cythonizing kernels/_cy_xent.pyx failed ({error})") from error


def run_setup(with_extension: bool) -> None:
    if with_extension:
        setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
    else:
        setup()


def main() -> None:
    mode = os.environ.get(BUILD_EXT_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"{BUILD_EXT_ENV} must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        _say(f"{BUILD_EXT_ENV}=0: not building the Cython extension")
        run_setup(False)
        return
    try:
        run_setup(True)
    except BuildFailed as error:
        if mode == "1":
            message = f"fastxent setup: {BUILD_EXT_ENV}=1 but the Cython extension failed to build: {error}"
            raise SystemExit(message) from error
        _say(f"the Cython extension could not be built: {error}")
        _say("installing without it (the numba and numpy backends); set FASTXENT_BUILD_EXT=1 to make this an error")
        run_setup(False)


main()
