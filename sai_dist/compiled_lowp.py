r"""``torch.compile``'d single-pass kernel for low-precision SGD-SaI state on CUDA.

The CUDA counterpart of :mod:`sai_dist.native_lowp`: for a parameter float32 or bfloat16
and a momentum buffer float32, bfloat16 or int8 (or none), one compiled kernel per piece
reads ``p``, ``g``, ``m`` (and, for int8, the block scales) from memory once and writes
``p``, ``m`` (and the scales) once, where the torch reference
(:func:`sai_dist.functional._low_precision_sgd_sai`) makes a dozen passes and chunked
int64 temporaries for the random bits. Per element, in float32:

.. math::
    m' = \operatorname{fma}(g, c, \hat m\,b) \;(\text{or } c\,g \text{ when born}),\qquad
    p' = \operatorname{fma}(m', a, p\,d)

(``coef = (b, c, d, a)`` as in :mod:`sai_dist.native`), then the stochastic rounding of
:mod:`sai_dist.momentum`: one draw ``mix(key ^ lo32(index))`` per element, its low 16
bits rounding the momentum (bfloat16: add and truncate; int8: ``floor(v * (1/s) + u)``
with ``s`` the block's absmax / 127, NaN skipped, dividing where ``1/s`` overflows, NaN
coding 0, clamped to ±127), its high 16 bits a bfloat16 parameter. An int8 piece is
viewed as rows of :data:`~sai_dist.momentum.BLOCK` elements (plus one short row for its
tail), so a block's absmax is a row reduction in the kernel that updates and encodes the
block; the new momentum is recomputed for the encoding (from the block's g and m, just
read) rather than stored, so no float32 copy of the piece is written (the tests check the
generated code for that).

Bits: the fused multiply-adds are ``inductor_prims.fma`` (``fma`` in Triton, ``fmadd`` in
inductor's vectorised CPU code), the rounding of torch's ``add_(alpha=...)``; and the
kernel is compiled with Triton's float32 division correctly rounded, subnormals kept and
no multiply-add contraction of its own, as torch's CUDA kernels compute. So it agrees with
the reference bit for bit, NaN sign bits aside (a maximised NaN gradient is multiplied by
-1 where the reference negates it). The tests check that on CPU, where inductor compiles
the same graph to C++, and on CUDA in the GPU suite. On CPU the native kernel is used
instead: this one is selected for tensors off the CPU (CUDA).

Compilation: each variant (born, what is rounded, dtypes, device) is compiled once on
tiny tensors the first time a piece needs it (:func:`variant_failure`); a real piece
may need one of its own where inductor specialises a shape (a length of 1, one equal to
another input's). A call that does not compile writes nothing and :meth:`Batch.run` hands
it back, so the caller steps exactly that part by the reference.

A piece whose element indices cross a multiple of :math:`2^{32}` (the draw's key changes
there) and float16 parameters are left to the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from sai_dist.momentum import _M32, BLOCK, Rounding, _mix_

__all__ = ["Batch", "failure", "supported", "variant_failure"]

_PARAMS = (torch.float32, torch.bfloat16)
_BUFFERS = (torch.float32, torch.bfloat16, torch.int8)
_PLAIN = (Tensor, torch.nn.Parameter)  # no tensor subclass (DTensor): layouts hand local pieces


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    from torch._inductor import inductor_prims  # imported late: torch._inductor is heavy

    return inductor_prims.fma(a, b, c)


def _round_bfloat16(x: Tensor, r16: Tensor) -> Tensor:
    # momentum.round_bfloat16: add 16 random bits below the kept ones and truncate;
    # non-finite values round to nearest.
    up = ((x.view(torch.int32) + r16.to(torch.int32)) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), up, x).to(torch.bfloat16)


def _step(
    p: Tensor,
    g: Tensor,
    m: Tensor | None,
    scales: Tensor | None,
    coef: Tensor,
    ints: Tensor,
    *,
    born: bool,
    round_m: bool,
    round_p: bool,
) -> None:
    """One piece (or its int8 tail), in place. ``p``, ``g``, ``m``: views of the piece,
    1-D, or for an int8 buffer 2-D, one row per block (the tail: one short row);
    ``scales``: the int8 block scales, one per row; ``coef``: float32 ``(b, c, d, a)``;
    ``ints``: int64 ``(key, lo32(first index))``. Every operation is elementwise or, for
    int8, a reduction along the rows, so the row length is the tensors' own shape: no
    reshape inside the graph, which would make inductor store float32 temporaries."""
    b, c, d, a = coef[0], coef[1], coef[2], coef[3]
    g32 = g.to(torch.float32)
    draw = None
    if round_m or round_p:
        count = torch.arange(p.numel(), device=p.device, dtype=torch.int64).view(p.shape)
        draw = _mix_(((ints[1] + count) & _M32) ^ ints[0])  # the reference's hash, in place on a temporary
    if m is None:
        direction = g32
    else:
        if born:
            new = g32 * c
        elif m.dtype == torch.int8:
            assert scales is not None
            new = _fma(g32, c, m.to(torch.float32) * scales.view(-1, 1) * b)
        else:
            new = _fma(g32, c, m.to(torch.float32) * b)
        direction = new
        if m.dtype == torch.float32:
            m.copy_(new)
        elif m.dtype == torch.bfloat16:
            assert draw is not None or not round_m
            m.copy_(_round_bfloat16(new, draw & 0xFFFF) if round_m else new.to(torch.bfloat16))
        else:
            assert scales is not None
            magnitude = new.abs()
            s = torch.where(torch.isnan(magnitude), 0.0, magnitude).amax(dim=1, keepdim=True) / 127.0
            recip = torch.where(s > 0, s.reciprocal(), 0.0)
            q = torch.where(s > 0, new * recip, 0.0)
            q = torch.where(torch.isinf(recip), new / s, q)
            if round_m:
                assert draw is not None
                q = torch.floor(q + (draw & 0xFFFF).to(torch.float32) * (2.0**-16))
            else:
                q = torch.round(q)
            m.copy_(q.clamp(-127, 127).nan_to_num(0.0).to(torch.int8))
            scales.copy_(s.view(-1))
    new_p = _fma(direction, a, p.to(torch.float32) * d)
    if p.dtype == torch.float32:
        p.copy_(new_p)
    elif round_p:
        assert draw is not None
        p.copy_(_round_bfloat16(new_p, (draw >> 16) & 0xFFFF))
    else:
        p.copy_(new_p.to(torch.bfloat16))


@functools.cache
def _compiled(born: bool, round_m: bool, round_p: bool) -> Callable[..., None]:
    # One compiled function per variant, the flags closure constants (partial's keywords
    # would be traced as symbolic ints under dynamic=True). Inputs are views and the
    # scalars travel in tensors, so one compilation per variant, dtypes and rank serves
    # every length, coefficient and key. All of them are entries of one code object's
    # cache (kernel's), told apart by guards on the flags: see _RECOMPILE_LIMIT.
    def kernel(p: Tensor, g: Tensor, m: Tensor | None, sc: Tensor | None, coef: Tensor, ints: Tensor) -> None:
        _step(p, g, m, sc, coef, ints, born=born, round_m=round_m, round_p=round_p)

    return torch.compile(kernel, dynamic=True, fullgraph=True, options=_INDUCTOR_OPTIONS)


# Inductor options of this kernel, for its bytes and for its bits:
# - a value read by several operations is stored as a float32 temporary once its expression
#   reads more than 4 buffers (the default): the new int8 momentum (g, m, its scale and two
#   coefficients) would be, 8 bytes per element. Recomputed instead, the absmax loop and the
#   encoding loop read g and m (a block apart) and nothing else is written;
# - Triton's float32 division is approximate (div.full) and flushes subnormals to zero, and
#   its compiler contracts a * b + c into a fused multiply-add by itself: torch's CUDA
#   kernels do none of these, and the int8 code's 1 / s and v / s (s subnormal in a block
#   of tiny momentum) and floor(v * (1 / s) + u) must round as the reference's do. (The
#   explicit fused multiply-adds are inductor_prims.fma, unaffected.) No effect on CPU.
_INDUCTOR_OPTIONS = {
    "realize_reads_threshold": 16,
    "eager_numerics.division_rounding": True,
    "eager_numerics.disable_ftz": True,
    "emulate_precision_casts": True,
}


def supported(param: Tensor, grad: Tensor, buf: Tensor | None, rounding: Rounding | None) -> bool:
    """Plain contiguous tensors of one shape on one device: parameter float32 or bfloat16, a
    floating-point gradient, buffer float32, bfloat16 or int8 (or none), and element
    indices that stay below one multiple of :math:`2^{32}`."""
    if (
        param.dtype not in _PARAMS
        or not grad.is_floating_point()
        or (buf is not None and buf.dtype not in _BUFFERS)
    ):
        return False
    for t in (param, grad) if buf is None else (param, grad, buf):
        if (
            type(t) not in _PLAIN
            or not t.is_contiguous()
            or t.shape != param.shape
            or t.device != param.device
        ):
            return False
    if rounding is not None and param.numel():
        first = rounding.offset
        if first >> 32 != (first + param.numel() - 1) >> 32:
            return False
    return True


def _flags(
    param: Tensor, buf: Tensor | None, rounding: Rounding | None, round_param: bool
) -> tuple[bool, bool]:
    """Whether the momentum and the parameter are rounded stochastically."""
    round_m = rounding is not None and buf is not None and buf.dtype != torch.float32
    round_p = round_param and rounding is not None and param.dtype == torch.bfloat16
    return round_m, round_p


def variant_failure(
    param: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    rounding: Rounding | None,
    *,
    born: bool,
    round_param: bool,
) -> str | None:
    """Why the kernel variant this piece needs (its dtypes, its device, whether it is born
    and what is rounded) cannot be compiled, or ``None``. Each variant is compiled once per
    process and device, on tiny tensors, the first time a piece asks, so a variant that
    does not compile leaves its pieces to the reference before any is touched. (A real
    piece can still need a compilation of its own, where inductor specialises a shape:
    :meth:`Batch.run` hands back what that one did not step.)"""
    round_m, round_p = _flags(param, buf, rounding, round_param)
    buf_dtype = None if buf is None else buf.dtype
    return _variant_failure(param.device, param.dtype, grad.dtype, buf_dtype, born, round_m, round_p)


def failure(device: torch.device | str) -> str | None:
    """Why the kernel cannot be compiled for ``device`` (the variant with every part: a
    bfloat16 parameter, int8 momentum, both rounded), or ``None``."""
    return _variant_failure(
        torch.device(device), torch.bfloat16, torch.bfloat16, torch.int8, False, True, True
    )


@functools.cache
def _variant_failure(
    device: torch.device,
    param_dtype: torch.dtype,
    grad_dtype: torch.dtype,
    buf_dtype: torch.dtype | None,
    born: bool,
    round_m: bool,
    round_p: bool,
) -> str | None:
    try:
        if device.type == "cuda":
            import triton  # noqa: F401  (inductor's CUDA backend)
        # int8: three rows (not two: the size of another input) and a short row, the two
        # graphs a real piece runs; a parameter that requires grad, as a model's does.
        n = 3 * BLOCK + 3 if buf_dtype == torch.int8 else 5
        p = torch.zeros(n, dtype=param_dtype, device=device, requires_grad=True)
        buf = None if buf_dtype is None else torch.zeros(n, dtype=buf_dtype, device=device)
        scales = torch.zeros(4, device=device) if buf_dtype == torch.int8 else None
        batch = Batch()
        batch.add(
            p,
            torch.zeros(n, dtype=grad_dtype, device=device),
            buf,
            scales,
            born=born,
            coef=(0.9, 0.1, 1.0, -0.1),
            rounding=Rounding(0, 1, 0, 0) if round_m or round_p else None,
            round_param=round_p,
        )
        if batch.run():
            return batch.failure
    except Exception as exc:  # any other failure (no triton, no device) means "not available"
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class _Piece(NamedTuple):
    param: Tensor
    grad: Tensor
    buf: Tensor | None
    scales: Tensor | None
    born: bool
    round_m: bool
    round_p: bool


class Batch:
    """Pieces collected for one step: :meth:`add` each, then :meth:`run`, which sends
    every piece's coefficients and keys to its device in two transfers and calls the
    compiled kernels (one per piece, two for an int8 piece with a short last block)."""

    def __init__(self) -> None:
        self._pieces: list[_Piece] = []
        self._coefs: list[tuple[float, float, float, float]] = []
        self._ints: list[tuple[int, int, int, int]] = []
        self.failure: str | None = None  # why the last run left a part unstepped

    def add(
        self,
        param: Tensor,
        grad: Tensor,
        buf: Tensor | None,
        scales: Tensor | None,
        *,
        born: bool,
        coef: Sequence[float],
        rounding: Rounding | None,
        round_param: bool,
    ) -> None:
        """One piece (:func:`supported` must hold); ``coef = (b, c, d, a)`` as in
        :mod:`sai_dist.native`; ``rounding`` its draws (``None``: round to nearest);
        ``round_param``: round a bfloat16 parameter stochastically. Nothing is written
        before :meth:`run`."""
        round_m, round_p = _flags(param, buf, rounding, round_param)
        key = first = 0
        if rounding is not None:
            key, first = rounding.key(rounding.offset >> 32), rounding.offset & _M32
        n = param.numel()
        full = n // BLOCK * BLOCK if buf is not None and buf.dtype == torch.int8 else n
        self._pieces.append(_Piece(param, grad, buf, scales, born, round_m, round_p))
        self._coefs.append(tuple(float(x) for x in coef))  # type: ignore[arg-type]
        # The int8 tail's first index follows the rows'.
        self._ints.append((key, first, key, (first + full) & _M32))

    def run(self) -> list[tuple[int, int]]:
        """Step every piece added (in place), then forget them. Returns ``(position,
        start)`` for each piece (in the order added) whose elements from ``start`` on were
        not stepped, because their kernel did not compile (nothing of them was written;
        :attr:`failure` says why): the caller steps those another way."""
        pieces, self._pieces = self._pieces, []
        if not pieces:
            return []
        devices = {piece.param.device for piece in pieces}
        coefs = {d: torch.tensor(self._coefs, dtype=torch.float32).to(d) for d in devices}
        ints = {d: torch.tensor(self._ints, dtype=torch.int64).view(-1, 2, 2).to(d) for d in devices}
        self._coefs, self._ints = [], []
        left: list[tuple[int, int]] = []
        # Every variant and dtype is a recompilation of the one kernel function: more
        # than dynamo's default limit of 8, so it is raised, for these calls only. No
        # grad: parameters that require it are written in place (and grad mode, guarded
        # on, stays one value, so no caller doubles the compilations).
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            for i, piece in enumerate(pieces):
                device = piece.param.device
                start = self._run(piece, coefs[device][i], ints[device][i])
                if start is not None:
                    left.append((i, start))
        return left

    def _run(self, piece: _Piece, coef: Tensor, ints: Tensor) -> int | None:
        """Step one piece; the first element it could not step, or ``None``."""
        p, g = piece.param.view(-1), piece.grad.view(-1)
        m = None if piece.buf is None else piece.buf.view(-1)
        n = p.numel()
        if m is None or m.dtype != torch.int8:
            return None if n == 0 or self._call(piece, (p, g, m, None, coef, ints[0])) else 0
        scales = piece.scales
        assert scales is not None
        full = n // BLOCK * BLOCK
        if full:
            rows = full // BLOCK
            parts = (t[:full].view(rows, BLOCK) for t in (p, g, m))
            if not self._call(piece, (*parts, scales[:rows], coef, ints[0])):
                return 0
        if full < n:
            parts = (t[full:].view(1, -1) for t in (p, g, m))
            if not self._call(piece, (*parts, scales[full // BLOCK :], coef, ints[1])):
                return full
        return None

    def _call(self, piece: _Piece, args: tuple[Tensor | None, ...]) -> bool:
        """One kernel call; ``False`` when it could not be compiled (nothing written)."""
        flags = (piece.born, piece.round_m, piece.round_p)
        # A call that failed once fails again (same graph): remembered, so a step does not
        # recompile it every time.
        call = (args[0].device, args[0].shape, *(None if t is None else t.dtype for t in args[:3]), *flags)  # type: ignore[union-attr]
        if call in _FAILED:
            self.failure = _FAILED[call]
            return False
        try:
            _compiled(*flags)(*args)
        except _compile_errors() as exc:  # raised before the kernel runs: nothing was written
            _FAILED[call] = self.failure = _reason(exc)
            return False
        return True


# Variants (3 flags) times dtypes (parameter, gradient, buffer), ranks (1-D, int8 rows, one
# short row) and inductor's specialisations (a size of 1, sizes equal to another input's):
# a few dozen, over dynamo's default of 8 per code object. Past it a call fails to compile
# (FailOnRecompileLimitHit, as fullgraph=True asks) and the caller steps it by the reference.
_RECOMPILE_LIMIT = 64
_FAILED: dict[tuple[object, ...], str] = {}


def _compile_errors() -> tuple[type[Exception], ...]:
    # Looked up when needed: importing torch._dynamo takes most of a second.
    from torch._dynamo import exc

    return (exc.TorchDynamoException, exc.FailOnRecompileLimitHit)
