r"""Single-pass CPU kernels, built once from a few lines of C with the system compiler.

Why C and not ``torch.compile``: measured on the 2-core CI-like machine (GPT-2-small
shapes, 148 tensors, 124 M fp32 elements, one process), a step through one call of the C
kernel below runs at 1.0x ``torch.optim.SGD(fused=True)``, while the ``torch.compile``'d
per-tensor kernel runs at 1.26x (one guarded call per tensor) and costs 5-25 s of
compilation per process; ``torch.utils.cpp_extension.load_inline`` would compile torch's
headers (about a minute on 2 cores). The source here includes no torch header, so it
compiles in well under a second, and the shared object is cached on disk, keyed by the
source, the compiler and the machine, so a process (a test, a rank) usually only loads it.

Kernels (every array holds one entry per tensor, pointers to contiguous float32 storage):

``sai_step``
    per tensor ``t`` of kind ``k[t]`` with coefficients ``(b, c, d, a)``:

    .. math::
        k = 0:&\quad p \leftarrow d\,p + a\,g \\
        k = 1:&\quad m \leftarrow b\,m + c\,g,\quad p \leftarrow d\,p + a\,m \\
        k = 2:&\quad m \leftarrow c\,g,\quad p \leftarrow d\,p + a\,m

    read p, g (and m), write p (and m), each element once: 20 bytes per element with
    momentum, the floor. The whole list is one OpenMP parallel region whose threads split
    the concatenated element range evenly (no per-tensor fork, no tiny-tensor imbalance).
``sai_moments``
    per tensor, float64 ``(sum x, sum x^2)``, or with a per-tensor ``shift``
    ``(sum (x-shift), sum (x-shift)^2)``: one read of the gradient per pass, no float64 copy.
    Per-thread partial sums are combined in thread order, so a result depends only on the
    thread count.

OpenMP comes from the runtime torch already loaded (``libgomp.so.1`` is resolved by soname),
so the kernels and torch's own ops share one thread pool; each call asks for
``torch.get_num_threads()`` threads.

:func:`library` returns ``None`` (and :func:`unavailable_reason` says why) when no compiler
works, when ``SAI_DIST_NATIVE=0``, or on a platform without ``ctypes`` loading; callers then
use torch ops. ``CC`` picks the compiler (default ``cc``); ``SAI_DIST_KERNEL_DIR`` the cache
directory (default ``$XDG_CACHE_HOME/sai_dist`` or ``~/.cache/sai_dist``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["advise_huge_pages", "library", "moments", "step", "supported", "unavailable_reason"]

#: Kernel kinds of one tensor's step (which C loop runs): no momentum, m = b m + c g, m born = c g.
STEP_PLAIN, STEP_MOMENTUM, STEP_BORN = 0, 1, 2

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* With SAI_MULTIVERSION (x86-64 GCC on glibc) the loops are compiled twice, for AVX2 and
   for the baseline, and the loader picks one per machine (ifunc): measured 1.5x faster
   statistics (float -> double conversion is compute-bound at SSE2 width). The arithmetic
   is the same in both (no FMA contraction under -std=c99), only the vector width differs. */
#ifdef SAI_MULTIVERSION
#define SAI_TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define SAI_TARGETS
#endif

/* Below this many elements in a whole call, one thread: forking costs more than it saves. */
#define SAI_SERIAL_BELOW 65536

static int64_t total_of(int64_t nt, const int64_t *n) {
    int64_t total = 0;
    for (int64_t t = 0; t < nt; t++) total += n[t];
    return total;
}

/* Thread `id` of `nth` owns elements [lo, hi) of the concatenation of all tensors; bounds
   are rounded to 64 elements so neighbours rarely write the same cache line. */
static void share(int64_t total, int id, int nth, int64_t *lo, int64_t *hi) {
    *lo = (total * id / nth) & ~(int64_t)63;
    *hi = id == nth - 1 ? total : (total * (id + 1) / nth) & ~(int64_t)63;
}

SAI_TARGETS void sai_range_plain(float *restrict p, const float *restrict g, int64_t s, int64_t e,
                                 float d, float a) {
    for (int64_t i = s; i < e; i++) p[i] = d * p[i] + a * g[i];
}

SAI_TARGETS void sai_range_momentum(float *restrict p, const float *restrict g, float *restrict m,
                                    int64_t s, int64_t e, float b, float c, float d, float a) {
    for (int64_t i = s; i < e; i++) {
        float mi = b * m[i] + c * g[i];
        m[i] = mi;
        p[i] = d * p[i] + a * mi;
    }
}

SAI_TARGETS void sai_range_born(float *restrict p, const float *restrict g, float *restrict m,
                                 int64_t s, int64_t e, float c, float d, float a) {
    for (int64_t i = s; i < e; i++) {
        float mi = c * g[i];
        m[i] = mi;
        p[i] = d * p[i] + a * mi;
    }
}

/* sum (x - c) and sum (x - c)^2 over x[s:e] in double, 8 independent lanes so the adds are
   not one latency-bound chain. */
SAI_TARGETS void sai_range_moments(const float *restrict x, int64_t s, int64_t e, double c,
                                   double *out) {
    double sum = 0.0, sq = 0.0;
#pragma omp simd reduction(+ : sum, sq) simdlen(8)
    for (int64_t i = s; i < e; i++) {
        double v = (double)x[i] - c;
        sum += v;
        sq += v * v;
    }
    out[0] = sum;
    out[1] = sq;
}

void sai_step(int64_t nt, float *const *P, const float *const *G, float *const *M,
              const int64_t *N, const int8_t *K, const float *C, int nthreads) {
    int64_t total = total_of(nt, N);
    if (total < SAI_SERIAL_BELOW || nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int id = 0, nth = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
        int64_t lo, hi, base = 0;
        share(total, id, nth, &lo, &hi);
        for (int64_t t = 0; t < nt && base < hi; base += N[t], t++) {
            int64_t s = lo > base ? lo - base : 0;
            int64_t e = hi - base < N[t] ? hi - base : N[t];
            if (s >= e) continue;
            const float *c = C + 4 * t;
            if (K[t] == 0)
                sai_range_plain(P[t], G[t], s, e, c[2], c[3]);
            else if (K[t] == 1)
                sai_range_momentum(P[t], G[t], M[t], s, e, c[0], c[1], c[2], c[3]);
            else
                sai_range_born(P[t], G[t], M[t], s, e, c[1], c[2], c[3]);
        }
    }
}

/* out[2t] = sum (x - shift[t]), out[2t+1] = sum (x - shift[t])^2, in double; shift may be NULL.
   Returns 0, or -1 if the partial-sum scratch could not be allocated. */
int sai_moments(int64_t nt, const float *const *X, const int64_t *N, const double *shift,
                double *out, int nthreads) {
    int64_t total = total_of(nt, N);
    if (total < SAI_SERIAL_BELOW || nthreads < 1) nthreads = 1;
    double *part = calloc((size_t)nthreads * (size_t)nt * 2 + 1, sizeof(double));
    if (!part) return -1;
    int used = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int id = 0, nth = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
        if (id == 0) used = nth;
        int64_t lo, hi, base = 0;
        share(total, id, nth, &lo, &hi);
        double *mine = part + (size_t)id * (size_t)nt * 2;
        for (int64_t t = 0; t < nt && base < hi; base += N[t], t++) {
            int64_t s = lo > base ? lo - base : 0;
            int64_t e = hi - base < N[t] ? hi - base : N[t];
            if (s >= e) continue;
            sai_range_moments(X[t], s, e, shift ? shift[t] : 0.0, mine + 2 * t);
        }
    }
    for (int64_t k = 0; k < nt * 2; k++) {
        double acc = 0.0;
        for (int id = 0; id < used; id++) acc += part[(size_t)id * (size_t)nt * 2 + k];
        out[k] = acc;
    }
    free(part);
    return 0;
}
"""

# Portable flags: no -march=native, so a cache shared between machines of one architecture
# stays valid (the kernels are memory-bound; wider vectors buy nothing measurable).
# -fno-math-errno only; no -ffast-math: the step's arithmetic must stay IEEE.
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c99", "-fno-math-errno", "-fopenmp"]

_reason: str | None = None


def _cache_dir() -> str:
    explicit = os.environ.get("SAI_DIST_KERNEL_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sai_dist")


def _compiler_identity(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()[0] if out.stdout else cc


class KernelUnavailable(RuntimeError):
    """A native kernel cannot be had here; the message says why."""


def _build(cc: str, name: str, source: str, target: str, extra: Sequence[str], libs: Sequence[str]) -> None:
    """Compile ``source`` into ``target`` atomically: concurrent processes (test ranks
    starting together) each build into a private file and rename it into place."""
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = os.path.join(tmp, f"{name}.c")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(tmp, f"{name}.so")
        proc = subprocess.run(
            [cc, *_FLAGS, *extra, src, "-o", out, *libs], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:500]}")
        os.replace(out, target)


def _build_best(
    cc: str, name: str, source: str, target: str, libs: Sequence[str], isa: Sequence[str] = ()
) -> None:
    """With ``isa`` (instruction-set flags such as ``-mavx2``, given only when this CPU has
    them) that build first; else, or if it fails, multiversioned (AVX2 + baseline, see the
    source) where the toolchain supports ``target_clones`` (x86-64 GCC on glibc), else the
    baseline alone."""
    if isa:
        try:
            _build(cc, name, source, target, isa, libs)
            return
        except RuntimeError:
            pass  # a compiler without these flags: the portable builds below
    if platform.machine() in ("x86_64", "AMD64") and sys.platform.startswith("linux"):
        try:
            _build(cc, name, source, target, ["-DSAI_MULTIVERSION"], libs)
            return
        except RuntimeError:
            pass  # clang or musl without ifunc: fall through to the portable build
    _build(cc, name, source, target, (), libs)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``/proc/cpuinfo``: ``avx2``, ``fma``,
    ...); empty where they cannot be read, so callers then build for the baseline."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def load_c_library(name: str, source: str, libs: Sequence[str] = (), isa: Sequence[str] = ()) -> ctypes.CDLL:
    """Build (once, cached) and load a C source of this package's kernels.

    The shared object lives under ``~/.cache/sai_dist`` (``SAI_DIST_KERNEL_DIR``), keyed by
    source, flags (``isa`` included: instruction-set flags the caller checked this CPU has,
    tried first, see :func:`_build_best`), compiler and machine; an unwritable cache falls
    back to a private directory. Raises :class:`KernelUnavailable` with the reason when disabled
    (``SAI_DIST_NATIVE=0``), on an unsupported platform, with no compiler, or when the build
    fails."""
    if os.environ.get("SAI_DIST_NATIVE", "1") == "0":
        raise KernelUnavailable("disabled by SAI_DIST_NATIVE=0")
    if sys.platform not in ("linux", "darwin") and not sys.platform.startswith("freebsd"):
        raise KernelUnavailable(f"no native kernels on {sys.platform}")
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise KernelUnavailable(f"no C compiler ({os.environ.get('CC', 'cc')!r} not found)")
    try:
        key = hashlib.sha256(
            "\0".join(
                [
                    source,
                    " ".join(_FLAGS + list(libs) + list(isa)),
                    _compiler_identity(cc),
                    platform.machine(),
                ]
            ).encode()
        ).hexdigest()[:16]
        target = os.path.join(_cache_dir(), f"{name}_{key}.so")
        if not os.path.exists(target):
            try:
                _build_best(cc, name, source, target, libs, isa)
            except PermissionError:
                # An unwritable cache (read-only home): build into a private directory.
                target = os.path.join(tempfile.mkdtemp(prefix="sai_dist_"), os.path.basename(target))
                _build_best(cc, name, source, target, libs, isa)
        return ctypes.CDLL(target)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"building {name} failed: {exc}") from exc


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; ``None`` when unavailable."""
    global _reason
    try:
        lib = load_c_library("sai_kernels", _SOURCE)
    except KernelUnavailable as exc:
        _reason = str(exc)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.sai_step.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.sai_step.restype = None
    lib.sai_moments.argtypes = [i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.sai_moments.restype = ctypes.c_int
    _reason = None
    return lib


def unavailable_reason() -> str | None:
    """Why :func:`library` returned ``None`` (``None`` if it loaded or was never asked)."""
    return _reason


def _dense(t: Tensor) -> bool:
    # Contiguous, or a permutation of contiguous storage (channels_last): the kernels walk
    # numel elements from data_ptr, so every tensor of one update must share its strides.
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def supported(*tensors: Tensor | None) -> bool:
    """Whether the kernels can update these tensors in place: plain CPU float32 tensors of
    one shape and strides, dense in memory (views into a flat buffer qualify)."""
    first = tensors[0]
    assert first is not None
    for t in tensors:
        if t is None:
            continue
        if (
            type(t) not in (Tensor, torch.nn.Parameter)
            or t.device.type != "cpu"
            or t.dtype != torch.float32
            or t.shape != first.shape
            or t.stride() != first.stride()
            or not _dense(t)
        ):
            return False
    return True


def _pointers(tensors: Sequence[Tensor | None]) -> Tensor:
    return torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64)


def step(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    buffers: Sequence[Tensor | None],
    kinds: Sequence[int],
    coefs: Sequence[tuple[float, float, float, float]],
) -> None:
    """One ``sai_step`` call over every tensor (see the module docstring for the update).
    The tensors must pass :func:`supported`; nothing is copied."""
    lib = library()
    assert lib is not None
    n = len(params)
    if n == 0:
        return
    # The index tensors must outlive the call: keep them in locals.
    p_ptr, g_ptr, m_ptr = _pointers(params), _pointers(directions), _pointers(buffers)
    numel = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    kind = torch.tensor(kinds, dtype=torch.int8)
    coef = torch.tensor(coefs, dtype=torch.float32).reshape(n, 4)
    lib.sai_step(
        n,
        p_ptr.data_ptr(),
        g_ptr.data_ptr(),
        m_ptr.data_ptr(),
        numel.data_ptr(),
        kind.data_ptr(),
        coef.data_ptr(),
        torch.get_num_threads(),
    )
    # Writes through raw pointers bypass autograd's version counters; bump them as an
    # in-place torch op would, so a graph that saved a parameter before the step still
    # raises "modified by an inplace operation" instead of silently using new values.
    torch.autograd.graph.increment_version([*params, *(m for m in buffers if m is not None)])


def moments(tensors: Sequence[Tensor], shift: Tensor | None = None) -> Tensor:
    """``[len(tensors), 2]`` float64: per tensor ``(sum x, sum x^2)``, or with ``shift``
    (float64, one value per tensor) ``(sum (x - shift), sum (x - shift)^2)``. The tensors
    must pass :func:`supported`."""
    lib = library()
    assert lib is not None
    n = len(tensors)
    out = torch.zeros(n, 2, dtype=torch.float64)
    if n == 0:
        return out
    x_ptr = _pointers(tensors)
    numel = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    shifts = None if shift is None else shift.to(torch.float64).contiguous()
    status = lib.sai_moments(
        n,
        x_ptr.data_ptr(),
        numel.data_ptr(),
        None if shifts is None else shifts.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("sai_moments could not allocate its partial sums")
    return out


_HUGE = 1 << 21  # x86-64 and aarch64 (4 KiB base pages) transparent huge page size
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Any:
    if not sys.platform.startswith("linux") or os.environ.get("SAI_DIST_HUGEPAGES", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: Tensor) -> None:
    """Ask Linux to back a fresh, not yet touched CPU tensor with transparent huge pages.

    A new momentum buffer is first touched by the step that fills it, and on a 4 KiB-page
    VM that first touch (one page fault per 4 KiB, each zeroing its page) cost as much as
    the step itself for GPT-2 small (~100 ms for 0.5 GB). Under the kernel's default THP
    mode (``madvise``) huge pages are only used where advised; with them the first touch
    takes one fault per 2 MiB. Advice only: on failure, on other systems, for small tensors
    or with ``SAI_DIST_HUGEPAGES=0`` nothing happens, and the values are never affected.
    """
    if t.device.type != "cpu" or t.numel() * t.element_size() < 2 * _HUGE:
        return
    madvise = _madvise()
    if madvise is None:
        return
    start = t.data_ptr()
    lo = -(-start // _HUGE) * _HUGE
    hi = (start + t.numel() * t.element_size()) // _HUGE * _HUGE
    if hi > lo:
        madvise(lo, hi - lo, _MADV_HUGEPAGE)
