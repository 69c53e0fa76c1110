r"""Storage of the momentum buffer (float32, bfloat16, int8) and stochastic rounding.

One module owns what the momentum is stored as, so the optimizer, the functional core,
checkpoints and the memory accounting agree on it:

- ``"float32"``: today's buffer, 4 B/element (the default; the fp32 path is untouched).
- ``"bfloat16"``: 2 B/element, written with *stochastic rounding* (unbiased): with
  :math:`\beta = 0.9` a round-to-nearest EMA drops every gradient contribution below half
  a bf16 ulp of the buffer (:math:`(1-\beta)|g| < 2^{-9}|m|`), so small gradients vanish.
- ``"int8"``: codes :math:`q \in [-127, 127]` plus one float32 scale per block of
  :data:`BLOCK` consecutive elements of a piece, :math:`m = q\,s_k`,
  :math:`s_k = \max_{i \in k} |m_i| / 127` (absmax, NaN skipped; linear code map), codes rounded
  stochastically: :math:`q = \lfloor m \cdot (1/s_k) + u \rfloor`, :math:`u \sim U[0, 1)`. The linear
  map is kept after measuring it against a dynamic (leading-zero exponent, linear fraction)
  map on the convergence benchmark (``benchmarks/int8_code_maps.py``, 6 seeds, 300 steps):
  dynamic minus linear on the same reference path -0.0015 nats/byte on the mean, per-seed
  standard deviation 0.0094, so the dynamic map is not clearly better and the linear one
  is simpler and what the kernels implement (docs/benchmarks.md). Blocks
  are laid from each piece's first element and never straddle pieces; the last block of a
  piece may be short. A parameter of fewer than :data:`SMALL` elements keeps float32
  momentum (its scales would cost more than they save, and tiny tensors such as norms and
  biases are the most sensitive); the rule looks at the *original* parameter's size, so
  it is the same under every mesh. Bytes of a piece of ``n`` elements: ``n + 4 ceil(n/B)``.

**Flat tensors** (ZeRO partitions, FSDP1 and fairscale FSDP shards) hold pieces of several
original parameters in one tensor, so the small-tensor rule, a property of each original
parameter, cannot be a property of the tensor's one buffer. Under ``"int8"`` a flat tensor
with at least one piece of a parameter of :data:`SMALL` elements or more keeps an int8
``momentum_buffer`` shaped like the tensor, and the pieces of smaller parameters are
stored, end to end in piece order, in a second float32 tensor ``momentum_small``
(:data:`~sai_dist.state_keys.MOMENTUM_SMALL`); their int8 bytes stay zero and they have
no scales (:class:`PieceStorage`). Every element is therefore stored exactly as the
single-process run stores it (int8 codes of the same block, or float32), which is what
lets a sharded run equal it bit for bit; the price is 1 unused byte per element of a small
piece (biases, norms: a few thousand elements per layer), counted exactly by
:func:`state_bytes`. Compacting the int8 buffer to the large pieces only would save those
bytes but give the buffer a shape of its own instead of the tensor's, which checkpoints,
probes and every wrapper's state handling rely on. ``"bfloat16"`` has no small rule: the
whole buffer is bfloat16.

The update itself is computed in float32 whatever the storage: the buffer is decoded,
:math:`m \leftarrow \beta m + (1-\beta) g` (or :math:`m = g` at first) and the parameter
step use that float32 value, then the new buffer is encoded (:mod:`sai_dist.functional`).

**Reproducible randomness.** Every random draw is a pure function of
``(seed, step, block, index)``, ``index`` the element's position in the flattened
*original* parameter (never global torch RNG state): a resumed run draws the same bits,
and a sharded run draws, for each element, the bits the single-process run draws for it.
The generator is a counter-based hash: one 32-bit draw per element and step, from one
application of a multiply-xorshift finaliser to the element's index under a key

.. code-block:: text

    mix(x) = x ^= x >> 16; x = (x * 0x7feb352d) mod 2^32; x ^= x >> 15;
             x = (x * 0x5bd1e995) mod 2^32; x ^= x >> 16
    key    = mix(mix(mix(mix(seed mod 2^32) ^ (step mod 2^32)) ^ block) ^ (index >> 32))
    draw   = mix(key ^ (index mod 2^32))

written with int64 tensor ops whose products stay below 2^63 (a 32-bit value times a
constant below 2^31), so the same formula in C (``uint32_t``) gives the same bits. The
draw's two halves are two *streams*: the parameter's rounding takes the high 16 bits
(:data:`STREAM_PARAM`), the momentum's the low 16 (:data:`STREAM_MOMENTUM`), so an element
whose parameter and momentum are both rounded costs one hash, not two. From 16 bits
:math:`r`: bfloat16 rounding adds :math:`r` to the float32 bit pattern and truncates
(exactly unbiased), int8 and float16 rounding use :math:`u = r / 2^{16}`.

Why one finaliser per element and shared halves: the rounding needs uniform bits that are
independent across elements, steps and the two streams, which a bijective finaliser of a
keyed counter gives; a second finaliser round, or a second draw for the parameter, bought
no measurable quality (the convergence benchmark) and cost the int8 and bf16-parameter
steps up to a quarter of their time (docs/performance.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sai_dist.state_keys import MOMENTUM, MOMENTUM_SCALE, MOMENTUM_SMALL, ROUNDING_STEP

__all__ = [
    "BLOCK",
    "MOMENTUM_DTYPES",
    "SMALL",
    "PieceStorage",
    "Rounding",
    "block_starts",
    "canonical_momentum_dtype",
    "check_runs",
    "decode",
    "decode_runs",
    "encode",
    "num_scales",
    "piece_storage",
    "runs_match",
    "state_bytes",
    "storage_dtype",
    "stored_pieces",
]

#: Names accepted for ``momentum_dtype``.
MOMENTUM_DTYPES = ("float32", "bfloat16", "int8")
#: Elements per int8 quantization block (one float32 scale each).
BLOCK = 2048
#: Parameters with fewer elements keep float32 momentum under ``momentum_dtype="int8"``.
SMALL = 4096
#: Storage dtype of each ``momentum_dtype``.
_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
_NAMES = {v: k for k, v in _STORAGE.items()}

#: The momentum's rounding bits: the low 16 of each element's draw.
STREAM_MOMENTUM = 0
#: The parameter's rounding bits: the high 16 of each element's draw.
STREAM_PARAM = 16
_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x5BD1E995
# Rounding works on chunks of whole blocks so its int64 temporaries stay small (8 MiB).
_CHUNK = 1 << 20


def canonical_momentum_dtype(value: object) -> str:
    """The name in :data:`MOMENTUM_DTYPES` for ``value`` (a name, ``torch.float32`` or
    ``torch.bfloat16``); ``ValueError`` naming the setting otherwise."""
    if isinstance(value, torch.dtype) and value in (torch.float32, torch.bfloat16):
        return _NAMES[value]
    if isinstance(value, str) and value in MOMENTUM_DTYPES:
        return value
    raise ValueError(
        f"Invalid momentum_dtype: {value!r} (must be one of {', '.join(map(repr, MOMENTUM_DTYPES))}, "
        "or torch.float32 / torch.bfloat16)"
    )


def storage_dtype(momentum_dtype: str | None, block_numel: int, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the buffer of a parameter of ``block_numel`` elements (the original
    parameter's size) is stored in: the parameter's own for ``None`` (the default, as
    before low-precision storage existed), float32 under int8 for parameters below
    :data:`SMALL`."""
    if momentum_dtype is None:
        return param_dtype
    if momentum_dtype == "int8" and block_numel < SMALL:
        return torch.float32
    return _STORAGE[momentum_dtype]


def storage_name(dtype: torch.dtype) -> str | None:
    """The ``momentum_dtype`` name of a stored buffer's dtype, ``None`` if it is not one."""
    return _NAMES.get(dtype)


def num_scales(piece_lengths: Sequence[int]) -> int:
    """float32 scales of an int8 buffer whose pieces have these lengths (blocks restart at
    each piece)."""
    return sum(math.ceil(n / BLOCK) for n in piece_lengths)


@dataclass(frozen=True)
class PieceStorage:
    """Where the momentum of each piece of one stepped tensor is kept.

    ``buffer`` is the dtype of ``momentum_buffer`` (shaped like the tensor). Piece ``k`` is
    stored either in that buffer (``small[k]`` False; for int8 with its scales at
    ``momentum_scale[scale_starts[k] : scale_starts[k] + ceil(n_k / BLOCK)]``) or, for a
    piece of a parameter under :data:`SMALL` elements beside int8 pieces, in float32 at
    ``momentum_small[small_starts[k] : small_starts[k] + n_k]``."""

    buffer: torch.dtype
    small: tuple[bool, ...]
    scale_starts: tuple[int | None, ...]
    small_starts: tuple[int | None, ...]
    num_scales: int
    small_numel: int


def _storage(buffer: torch.dtype, small: Sequence[bool], lengths: Sequence[int]) -> PieceStorage:
    scale_starts: list[int | None] = []
    small_starts: list[int | None] = []
    k_scale = k_small = 0
    for is_small, n in zip(small, lengths, strict=True):
        if is_small:
            small_starts.append(k_small)
            scale_starts.append(None)
            k_small += n
        else:
            small_starts.append(None)
            scale_starts.append(k_scale if buffer == torch.int8 else None)
            k_scale += math.ceil(n / BLOCK) if buffer == torch.int8 else 0
    return PieceStorage(buffer, tuple(small), tuple(scale_starts), tuple(small_starts), k_scale, k_small)


def piece_storage(
    momentum_dtype: str | None, block_numels: Sequence[int], lengths: Sequence[int], param_dtype: torch.dtype
) -> PieceStorage:
    """The storage of a new buffer for a tensor whose pieces (``lengths`` elements each)
    belong to original parameters of ``block_numels`` elements: each piece stored as
    :func:`storage_dtype` says for its own parameter; a tensor mixing int8 and float32
    pieces keeps an int8 buffer and the float32 pieces in ``momentum_small``."""
    per = [storage_dtype(momentum_dtype, n, param_dtype) for n in block_numels]
    if not per:
        return _storage(storage_dtype(momentum_dtype, 0, param_dtype), [], [])
    if torch.int8 in per:
        return _storage(torch.int8, [d != torch.int8 for d in per], lengths)
    return _storage(per[0], [False] * len(per), lengths)


def stored_pieces(buffer: torch.dtype, block_numels: Sequence[int], lengths: Sequence[int]) -> PieceStorage:
    """The :class:`PieceStorage` of an existing buffer of dtype ``buffer``: an int8 buffer
    keeps the pieces of parameters under :data:`SMALL` in ``momentum_small`` (the rule
    that made it); any other buffer holds every piece."""
    # Asked for every int8 tensor at every step with the same sizes: remembered (a pure
    # function of its arguments, and PieceStorage is frozen).
    return _stored_pieces(buffer, tuple(block_numels), tuple(lengths))


@functools.lru_cache(maxsize=4096)
def _stored_pieces(
    buffer: torch.dtype, block_numels: tuple[int, ...], lengths: tuple[int, ...]
) -> PieceStorage:
    small = [buffer == torch.int8 and n < SMALL for n in block_numels]
    if small and all(small) and buffer == torch.int8:
        small = [False] * len(small)  # an int8 buffer of small pieces only: none is set aside
    return _storage(buffer, small, lengths)


def state_bytes(
    momentum_dtype: str | None,
    block_numel: int | Sequence[int],
    piece_lengths: Sequence[int],
    param_dtype: torch.dtype,
    *,
    buffer_numel: int | None = None,
) -> int:
    """Exact bytes of the momentum state of one stored tensor: buffer plus int8 scales
    plus the float32 ``momentum_small`` of a flat tensor's small pieces.

    ``block_numel``: the original parameter's size (one int, every piece of one parameter)
    or one size per piece; ``buffer_numel``: the tensor's elements when more than its
    pieces' (a flat partition's alignment padding, stored like the buffer)."""
    numels = [block_numel] * len(piece_lengths) if isinstance(block_numel, int) else list(block_numel)
    st = piece_storage(momentum_dtype, numels, piece_lengths, param_dtype)
    n = sum(piece_lengths) if buffer_numel is None else buffer_numel
    if not piece_lengths and isinstance(block_numel, int):
        # A tensor with no piece here (an empty shard): decided on the parameter's size.
        st = _storage(storage_dtype(momentum_dtype, block_numel, param_dtype), [], [])
    return n * st.buffer.itemsize + 4 * st.num_scales + 4 * st.small_numel


# -- counter-based generator -----------------------------------------------------------------


def _mix_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    x ^= x >> 16
    return x


def _mix_(x: Tensor) -> Tensor:
    """:func:`_mix_int` in place on an int64 tensor of values in ``[0, 2^32)``."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_C1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_C2).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    return x


class Rounding(NamedTuple):
    """Where one piece's random draws come from: the run's ``seed``, the tensor's update
    count ``step``, its model ``block`` and ``offset``, the index of the piece's first
    element in the flattened original parameter. (A NamedTuple, not a frozen dataclass:
    one is built per piece per step, and this is the cheaper immutable record.)"""

    seed: int
    step: int
    block: int
    offset: int

    def key(self, high: int = 0) -> int:
        """The draw's key for the elements whose index has ``index >> 32 == high``."""
        k = _mix_int(_mix_int(_mix_int(self.seed) ^ (self.step & _M32)) ^ (self.block & _M32))
        return _mix_int(k ^ high)

    def draws(self, start: int, n: int, device: torch.device) -> Tensor:
        """The 32-bit draws (int64 in ``[0, 2^32)``) of the piece's elements
        ``start .. start + n``."""
        first, last = self.offset + start, self.offset + start + n
        index = torch.arange(first, last, dtype=torch.int64, device=device)
        if first >> 32 == (last - 1) >> 32 or n == 0:
            return _mix_(index.bitwise_and_(_M32).bitwise_xor_(self.key(first >> 32)))
        keys = torch.tensor([self.key(h) for h in range(first >> 32, ((last - 1) >> 32) + 1)], device=device)
        high = (index >> 32) - (first >> 32)
        return _mix_(index.bitwise_and_(_M32).bitwise_xor_(keys[high]))

    def bits(self, stream: int, start: int, n: int, device: torch.device) -> Tensor:
        """16 random bits (int64 in ``[0, 2^16)``) of ``stream`` (:data:`STREAM_MOMENTUM`
        or :data:`STREAM_PARAM`) for the piece's elements ``start .. start + n``."""
        if stream not in (STREAM_MOMENTUM, STREAM_PARAM):
            raise ValueError(f"stream={stream!r}: must be STREAM_MOMENTUM (0) or STREAM_PARAM (16)")
        return (self.draws(start, n, device) >> stream).bitwise_and_(0xFFFF)


def _uniform(bits: Tensor) -> Tensor:
    # 16 bits: exactly representable in float32, u in [0, 1).
    return bits.to(torch.float32).mul_(2.0**-16)


def round_bfloat16(x: Tensor, bits: Tensor) -> Tensor:
    """``x`` (float32) rounded stochastically to bfloat16: adding 16 random bits (``bits``,
    values in ``[0, 2^16)``) below the kept ones and truncating rounds up with probability
    equal to the discarded fraction, so the expectation is ``x``. Non-finite values round
    to nearest."""
    noise = bits.to(torch.int32)
    rounded = (x.view(torch.int32) + noise).bitwise_and_(-65536).view(torch.float32)
    out = rounded.to(torch.bfloat16)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        out = torch.where(finite, out, x.to(torch.bfloat16))
    return out


def round_float16(x: Tensor, bits: Tensor) -> Tensor:
    """``x`` (float32) rounded stochastically to float16: the nearest value ``y`` or its
    neighbour toward ``x``, the latter with probability ``|x - y| / |neighbour - y|``."""
    y = x.to(torch.float16)
    toward = torch.where(x > y.to(torch.float32), math.inf, -math.inf).to(torch.float16)
    other = torch.nextafter(y, toward)
    y32, other32 = y.to(torch.float32), other.to(torch.float32)
    gap = other32 - y32
    frac = torch.where(gap != 0, (x - y32) / gap, 0.0)
    frac = torch.where(torch.isfinite(frac), frac, 0.0)
    return torch.where(_uniform(bits) < frac, other, y)


def round_to(x: Tensor, dtype: torch.dtype, rounding: Rounding | None, stream: int, start: int = 0) -> Tensor:
    """``x`` (float32) in ``dtype``: stochastically rounded with ``rounding``'s draws for
    16-bit dtypes, to nearest when ``rounding`` is ``None`` (or for float32)."""
    if dtype == x.dtype:
        return x
    if rounding is None or dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    flat_x, flat_out = x.reshape(-1).to(torch.float32), out.view(-1)
    for lo in range(0, flat_x.numel(), _CHUNK):
        hi = min(lo + _CHUNK, flat_x.numel())
        bits = rounding.bits(stream, start + lo, hi - lo, x.device)
        if dtype == torch.bfloat16:
            flat_out[lo:hi] = round_bfloat16(flat_x[lo:hi], bits)
        else:
            flat_out[lo:hi] = round_float16(flat_x[lo:hi], bits)
    return out


# -- encode / decode -------------------------------------------------------------------------


def _block_scales(x: Tensor) -> Tensor:
    """absmax / 127 of each :data:`BLOCK` of the 1-D float32 ``x`` (the last may be short).

    A NaN is skipped (as if 0), so one NaN costs its own element, not its block's scale:
    the NaN's code is 0 and the block's other codes keep their values."""
    n = x.numel()
    full = n // BLOCK * BLOCK
    a = x.abs()
    if bool(torch.isnan(a).any()):
        a = torch.where(torch.isnan(a), 0.0, a)
    parts = []
    if full:
        parts.append(a[:full].view(-1, BLOCK).amax(dim=1))
    if full < n:
        parts.append(a[full:].amax().reshape(1))
    return torch.cat(parts) / 127.0 if parts else x.new_zeros(0)


def _reciprocals(scales: Tensor) -> tuple[Tensor, bool]:
    """``1 / s`` of each block scale (float32, rounded once), and whether any overflowed.

    Codes are ``floor(v * (1 / s) + u)``: one multiply per element instead of a division,
    the same values in the kernel. A block whose ``1 / s`` overflows float32 (``s`` below
    ``2^-128``: a block whose absmax is below about ``2^-121``) divides instead, as ``v / s`` is still at
    most 127 there."""
    recips = torch.where(scales > 0, scales.reciprocal(), 0.0)
    return recips, bool(torch.isinf(recips).any())


def _per_element(scales: Tensor, n: int) -> Tensor:
    return scales.repeat_interleave(BLOCK)[:n]


def decode(buf: Tensor, scales: Tensor | None) -> Tensor:
    """The float32 value of a piece's stored buffer (1-D view or any shape; ``scales``, its
    int8 block scales, required for int8). float32 buffers come back as themselves."""
    if buf.dtype == torch.int8:
        assert scales is not None
        flat = buf.reshape(-1).to(torch.float32)
        return flat.mul_(_per_element(scales, flat.numel())).view(buf.shape)
    return buf if buf.dtype == torch.float32 else buf.to(torch.float32)


def encode(
    value: Tensor,
    buf: Tensor,
    scales: Tensor | None,
    rounding: Rounding | None,
    *,
    stream: int = STREAM_MOMENTUM,
) -> None:
    """Store the float32 ``value`` of one piece into its buffer ``buf`` (and, for int8,
    its block ``scales``, written in place): stochastically rounded with ``rounding``'s
    draws, to nearest when ``rounding`` is ``None`` (checkpoint conversion)."""
    if buf.dtype == torch.float32:
        buf.copy_(value)
        return
    if buf.dtype != torch.int8:
        buf.copy_(round_to(value, buf.dtype, rounding, stream))
        return
    assert scales is not None
    flat_v, flat_b = value.reshape(-1), buf.view(-1)
    n = flat_v.numel()
    scales.copy_(_block_scales(flat_v))
    recips, overflow = _reciprocals(scales)
    for lo in range(0, n, _CHUNK):  # _CHUNK is a multiple of BLOCK: chunks hold whole blocks
        hi = min(lo + _CHUNK, n)
        blocks = slice(lo // BLOCK, (hi + BLOCK - 1) // BLOCK)
        per = _per_element(scales[blocks], hi - lo)
        recip = _per_element(recips[blocks], hi - lo)
        q = torch.where(per > 0, flat_v[lo:hi] * recip, 0.0)
        if overflow:
            q = torch.where(torch.isinf(recip), flat_v[lo:hi] / per, q)
        if rounding is None:
            q = q.round_()
        else:
            q = q.add_(_uniform(rounding.bits(stream, lo, hi - lo, value.device))).floor_()
        # a NaN (a NaN momentum, or inf * 0 in a block of infinite scale) codes 0, as the kernel
        flat_b[lo:hi] = q.clamp_(-127, 127).nan_to_num_(0.0).to(torch.int8)


def convert(
    buf: Tensor, scales: Tensor | None, target: torch.dtype, spans: Sequence[tuple[int, int]]
) -> tuple[Tensor, Tensor | None]:
    """A loaded buffer of another storage dtype re-encoded as ``target`` piece by piece
    (``spans``: ``(start, stop)`` of each piece in the flattened buffer, in order), rounding
    to nearest: exact from int8 or bfloat16 to float32, one rounding otherwise. Elements
    outside every piece (alignment padding) are zero."""
    flat = buf.reshape(-1)
    out = torch.zeros(buf.shape, dtype=target, device=buf.device)
    out_flat = out.view(-1)
    lengths = [stop - start for start, stop in spans]
    new_scales = None
    if target == torch.int8:
        new_scales = torch.zeros(num_scales(lengths), dtype=torch.float32, device=buf.device)
    k = 0
    for (start, stop), n in zip(spans, lengths, strict=True):
        nk = math.ceil(n / BLOCK)
        old = None if scales is None else scales[k : k + nk]
        new = None if new_scales is None else new_scales[k : k + nk]
        encode(decode(flat[start:stop], old), out_flat[start:stop], new, None)
        k += nk
    return out, new_scales


# -- the optimizer's per-tensor state ---------------------------------------------------------


def check_settings(momentum_dtype: object, stochastic_rounding: object, seed: object) -> str | None:
    """Validate the optimizer-wide keywords; the canonical ``momentum_dtype`` name
    (``None``, the default, stays ``None``: the parameter's dtype)."""
    name = None if momentum_dtype is None else canonical_momentum_dtype(momentum_dtype)
    if stochastic_rounding is not None and not isinstance(stochastic_rounding, bool):
        raise ValueError(f"Invalid stochastic_rounding: {stochastic_rounding!r} (must be None or a bool)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"Invalid seed: {seed!r} (must be an int in [0, 2**63))")
    return name


def check_params(params: Sequence[Tensor], where: Sequence[str], stochastic_rounding: bool | None) -> None:
    """Refuse float16 parameters whose updates would be rounded to nearest: with 10
    mantissa bits every update below 2^-11 of a weight (lr 1e-3 times a unit-scale
    momentum already is, for weights above 0.5) rounds back to the old value, so those
    weights silently stop training."""
    if stochastic_rounding is not False:
        return
    for p, name in zip(params, where, strict=True):
        if isinstance(p, Tensor) and p.dtype == torch.float16:
            raise ValueError(
                f"SGDSaI: {name} is a float16 parameter and stochastic_rounding=False: rounded to nearest, "
                "every update smaller than 2^-11 of a weight is lost, so training stalls silently. Use "
                "stochastic_rounding=None/True (unbiased rounding of the update), or keep float32 master "
                "weights (torch.autocast / a mixed-precision wrapper) and step those."
            )


def uses_rounding(param: Tensor, stored: torch.dtype | None, round_param: bool) -> bool:
    """Whether stepping ``param`` (local dtype) with a buffer stored as ``stored`` draws
    random bits: a 16-bit or int8 buffer always, a 16-bit parameter when ``round_param``."""
    low_buffer = stored is not None and stored != torch.float32
    return low_buffer or (round_param and param.dtype in (torch.bfloat16, torch.float16))


def piece_spans(layout: Any, param: Tensor) -> list[tuple[int, int]]:
    """``(start, stop)`` of each of ``param``'s pieces in its flattened local tensor."""
    n = layout.local(param).numel()
    return [(0, n) if pc.span is None else pc.span for pc in layout.pieces(param)]


def _block_numels(layout: Any, param: Tensor) -> list[int]:
    """Per piece, its original parameter's element count (``param``'s own where the layout
    cannot say)."""
    origin = layout.element_origin(param)
    if origin is None:
        return [param.numel()] * len(layout.pieces(param))
    return [o.numel for o in origin]


def _loaded_storage(layout: Any, param: Tensor, buf: Tensor) -> PieceStorage:
    spans = piece_spans(layout, param)
    return stored_pieces(buf.dtype, _block_numels(layout, param), [b - a for a, b in spans])


def _check_float_vector(value: Any, want: int, what: str, name: str) -> None:
    if (
        isinstance(value, Tensor)
        and value.dim() == 1
        and value.dtype == torch.float32
        and value.numel() == want
    ):
        return
    got = (
        f"shape {tuple(value.shape)}, dtype {value.dtype}" if isinstance(value, Tensor) else repr(type(value))
    )
    raise ValueError(f"SGDSaI.load_state_dict: the int8 {MOMENTUM} of {name} needs {what}, got {got}")


def check_loaded(entry: dict[str, Any], layout: Any, param: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` when a loaded state entry's momentum storage
    cannot be this tensor's: an unknown dtype, int8 codes without (or with the wrong number
    of) block scales, scales beside a non-int8 buffer, a ``momentum_small`` of the wrong
    size or beside anything but the int8 codes of a flat tensor with small pieces."""
    buf, scales, small = entry.get(MOMENTUM), entry.get(MOMENTUM_SCALE), entry.get(MOMENTUM_SMALL)
    if buf is None:
        for key, value in ((MOMENTUM_SCALE, scales), (MOMENTUM_SMALL, small)):
            if value is not None:
                raise ValueError(f"SGDSaI.load_state_dict: {name} has a {key} but no {MOMENTUM}")
        return
    if not isinstance(buf, Tensor) or not (buf.is_floating_point() or buf.dtype == torch.int8):
        got = buf.dtype if isinstance(buf, Tensor) else type(buf).__name__
        raise ValueError(
            f"SGDSaI.load_state_dict: the {MOMENTUM} of {name} is stored as {got}; momentum is a "
            "floating-point tensor or int8 codes"
        )
    if buf.dtype != torch.int8:
        for key, value in ((MOMENTUM_SCALE, scales), (MOMENTUM_SMALL, small)):
            if value is not None:
                raise ValueError(
                    f"SGDSaI.load_state_dict: {name} has a {key} beside a {buf.dtype} {MOMENTUM}; "
                    "only int8 momentum has block scales and float32 small pieces"
                )
        return
    st = _loaded_storage(layout, param, buf)
    _check_float_vector(
        scales,
        st.num_scales,
        f"a 1-D float32 {MOMENTUM_SCALE} of {st.num_scales} block scales (one per {BLOCK} elements of "
        "each int8 piece)",
        name,
    )
    if st.small_numel or small is not None:
        _check_float_vector(
            small,
            st.small_numel,
            f"a 1-D float32 {MOMENTUM_SMALL} of {st.small_numel} elements (its pieces of parameters under "
            f"{SMALL} elements)",
            name,
        )


def convert_storage(
    buf: Tensor,
    scales: Tensor | None,
    small: Tensor | None,
    source: PieceStorage,
    target: PieceStorage,
    spans: Sequence[tuple[int, int]],
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`convert` for tensors whose pieces may be stored apart (:class:`PieceStorage`):
    each piece decoded from where ``source`` keeps it and encoded, rounding to nearest, where
    ``target`` does. Returns the new buffer, scales (int8) and ``momentum_small`` (or
    ``None``); elements outside every piece or kept apart are zero in the buffer."""
    flat = buf.reshape(-1)
    out = torch.zeros(buf.shape, dtype=target.buffer, device=buf.device)
    out_flat = out.view(-1)
    new_scales = None
    if target.buffer == torch.int8:
        new_scales = torch.zeros(target.num_scales, dtype=torch.float32, device=buf.device)
    new_small = (
        torch.zeros(target.small_numel, dtype=torch.float32, device=buf.device)
        if target.small_numel
        else None
    )

    def where(
        st: PieceStorage,
        k: int,
        n: int,
        buffer: Tensor,
        sc: Tensor | None,
        sm: Tensor | None,
        span: tuple[int, int],
    ):
        if st.small[k]:
            lo = st.small_starts[k]
            assert sm is not None and lo is not None
            return sm[lo : lo + n], None
        lo = st.scale_starts[k]
        return buffer[span[0] : span[1]], (
            None if lo is None or sc is None else sc[lo : lo + math.ceil(n / BLOCK)]
        )

    for k, span in enumerate(spans):
        n = span[1] - span[0]
        src, src_scales = where(source, k, n, flat, scales, small, span)
        dst, dst_scales = where(target, k, n, out_flat, new_scales, new_small, span)
        encode(decode(src, src_scales), dst, dst_scales, None)
    return out, new_scales, new_small


def decoded_momentum(entry: dict[str, Any], layout: Any, param: Tensor) -> Tensor | None:
    """The float32 value of ``param``'s stored momentum (its :meth:`local` tensor's shape;
    ``None`` without a buffer), every piece decoded from where it is kept, zero elsewhere:
    for converters that write a storage-free form (``sai_dist.deepspeed``'s
    world-size-free checkpoint)."""
    buf = entry.get(MOMENTUM)
    if buf is None:
        return None
    local = layout.local(buf)
    if local.dtype == torch.float32:
        return local
    st = _loaded_storage(layout, param, local)
    spans = piece_spans(layout, param)
    out, _, _ = convert_storage(
        local,
        entry.get(MOMENTUM_SCALE),
        entry.get(MOMENTUM_SMALL),
        st,
        _storage(torch.float32, [False] * len(spans), [b - a for a, b in spans]),
        spans,
    )
    return out


def restore_loaded(
    state: dict[str, Any], loaded: dict[str, Any], layout: Any, param: Tensor, momentum_dtype: str | None
) -> None:
    """Put a checked entry's momentum storage into ``state``, on the parameter's device,
    converted (rounding to nearest, see :func:`convert`) when it was saved with another
    ``momentum_dtype`` than this optimizer's."""
    if ROUNDING_STEP in loaded:
        state[ROUNDING_STEP] = torch.as_tensor(loaded[ROUNDING_STEP]).detach().to("cpu", torch.int64).clone()
    buf = loaded.get(MOMENTUM)
    if buf is None:
        return
    buf = buf.detach().to(device=param.device)
    local = layout.local(buf)
    scales, small = loaded.get(MOMENTUM_SCALE), loaded.get(MOMENTUM_SMALL)
    if scales is not None:
        scales = scales.detach().to(device=local.device, dtype=torch.float32)
    if small is not None:
        small = small.detach().to(device=local.device, dtype=torch.float32)
    spans = piece_spans(layout, param)
    lengths = [b - a for a, b in spans]
    numels = _block_numels(layout, param)
    target = piece_storage(momentum_dtype, numels, lengths, param.dtype)
    state.pop(MOMENTUM_SCALE, None)
    state.pop(MOMENTUM_SMALL, None)
    if buf.dtype == target.buffer:
        state[MOMENTUM] = buf
        if scales is not None:
            state[MOMENTUM_SCALE] = scales
        if small is not None:
            state[MOMENTUM_SMALL] = small
        return
    source = stored_pieces(buf.dtype, numels, lengths)
    new_local, new_scales, new_small = convert_storage(local, scales, small, source, target, spans)
    out = torch.empty_like(buf, dtype=target.buffer)
    layout.local(out).copy_(new_local)
    state[MOMENTUM] = out
    if new_scales is not None:
        state[MOMENTUM_SCALE] = new_scales
    if new_small is not None:
        state[MOMENTUM_SMALL] = new_small


# -- mesh-independent int8 scales (DCP checkpoints) ----------------------------------------------
#
# A rank's int8 blocks start at its piece's first element, so its scales describe *runs* of
# the original parameter that depend on the mesh. A checkpoint that any mesh can read saves
# them as a table of runs instead: ``starts`` (int64, the original-element index of each
# run's first element, strictly increasing from 0) and ``scales`` (float32, one per run); run
# ``j`` covers ``starts[j] .. starts[j + 1]`` (the last, up to the parameter's end). The
# table of every rank's runs tiles the parameter, costs 12 bytes per 2048 elements and is
# never a dequantized copy of the state.


def block_starts(offset: int, n: int) -> Tensor:
    """Original-element index of the first element of each int8 block of a piece of ``n``
    elements whose first element is element ``offset`` of the original parameter."""
    return torch.arange(offset, offset + n, BLOCK, dtype=torch.int64)


def check_runs(starts: object, scales: object, numel: int, name: str) -> None:
    """``ValueError`` naming ``name`` unless ``(starts, scales)`` is a table of runs of a
    parameter of ``numel`` elements: 1-D int64 starts, strictly increasing from 0, below
    ``numel``; 1-D float32 scales, one per run."""
    ok = (
        isinstance(starts, Tensor)
        and isinstance(scales, Tensor)
        and starts.dim() == 1
        and scales.dim() == 1
        and starts.dtype == torch.int64
        and scales.dtype == torch.float32
        and starts.numel() == scales.numel()
    )
    if ok and starts.numel():
        ok = int(starts[0]) == 0 and int(starts[-1]) < numel and bool((starts[1:] > starts[:-1]).all())
    elif ok:
        ok = numel == 0
    if not ok:
        got = (
            f"starts {tuple(starts.shape)} {starts.dtype}, scales {tuple(scales.shape)} {scales.dtype}"
            if isinstance(starts, Tensor) and isinstance(scales, Tensor)
            else f"{type(starts).__name__}, {type(scales).__name__}"
        )
        raise ValueError(
            f"checkpoint: the int8 momentum of {name} ({numel} elements) needs a table of scale runs (1-D "
            "int64 starts strictly increasing from 0 and below the parameter's size, one 1-D float32 scale "
            f"each), got {got}; the checkpoint is damaged or was not written by sai_dist.checkpoint.save"
        )


def runs_match(starts: Tensor, numel: int, offset: int, n: int) -> slice | None:
    """The rows of the runs table that are exactly this piece's blocks (the piece covers
    original elements ``offset .. offset + n``), ``None`` when the runs fall otherwise: the
    saved codes and scales are then this piece's own, bit for bit."""
    if n == 0:
        return slice(0, 0)
    end = offset + n
    lo = int(torch.searchsorted(starts, torch.tensor(offset)))
    hi = int(torch.searchsorted(starts, torch.tensor(end)))
    closes = end == numel or (hi < starts.numel() and int(starts[hi]) == end)
    if closes and torch.equal(starts[lo:hi], block_starts(offset, n)):
        return slice(lo, hi)
    return None


def decode_runs(codes: Tensor, offset: int, starts: Tensor, scales: Tensor) -> Tensor:
    r"""The float32 value (flat) of int8 ``codes`` of original elements
    ``offset .. offset + n``: :math:`m_i = q_i\, s_{j(i)}`, :math:`j(i)` the run holding
    element ``offset + i``. Works in chunks, so the temporaries beside the result stay
    small (one float32 tensor of the piece is the peak)."""
    flat = codes.reshape(-1)
    n = flat.numel()
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    starts, scales = starts.to(codes.device), scales.to(codes.device)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        index = torch.arange(offset + lo, offset + hi, dtype=torch.int64, device=codes.device)
        run = torch.searchsorted(starts, index, right=True).sub_(1)
        out[lo:hi] = flat[lo:hi].to(torch.float32).mul_(scales[run])
    return out
