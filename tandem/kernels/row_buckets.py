"""Row counts rounded up to a bounded set, for half-precision matmuls on CPU.

On CPU, torch runs bfloat16/float16 matmuls through oneDNN, which compiles a kernel for every
shape it meets and keeps it for the life of the process (0.5-2 MB each; its primitive-cache
capacity does not bound them). A serving engine meets every row count from 1 to its token
budget, so memory grew by hundreds of MB to GBs. Rounding the rows up to a bucket (exact up to
16, then 8 buckets per doubling) bounds the shapes to about 8 per doubling of the token
budget, at the cost of fewer than 1/8 extra rows. float32 and CUDA need no padding.

A product whose other operand is as wide as a layer's output (a training backward's
dy W, the trained adapter's expand into y) would copy all of it to pad it. Those split their
rows instead (mm, addmm, mm_over_rows): the largest bucket that fits runs on views of the
rows as they are, and only the few left over (fewer than 1/8 of them) are padded to theirs.
A new shape is also slow to meet: on a 2-core Xeon with AMX, dy W for 257-512 rows of
SmolLM2's gate/up took ~21 ms and 1.75 MB more at each new row count than at one it had met.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

EXACT_ROWS = 16
_PADDED_DTYPES = (torch.bfloat16, torch.float16)


def bucket_rows(rows: int) -> int:
    """The bucket a row count runs in: rows itself up to EXACT_ROWS, else rounded up to a
    multiple of 1/16 of the next power of two (< 1/8 more rows)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << ((rows - 1).bit_length() - 4)
    return -(-rows // step) * step


def bucket_below(rows: int) -> int:
    """The largest bucket of at most rows (rows itself up to EXACT_ROWS): a multiple of the
    step of rows' own range, or the power of two below it, which is a bucket of the range below."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << ((rows - 1).bit_length() - 4)
    return rows // step * step


def needs_buckets(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _PADDED_DTYPES


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear over x's rows, padded to their bucket where the shape would otherwise be new."""
    rows = x.shape[0]
    if not needs_buckets(x) or (padded := bucket_rows(rows)) == rows:
        return F.linear(x, weight, bias)
    return F.linear(_padded(x, padded), weight, bias)[:rows]


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] @ b [K, N], M split into bucketed row counts where it is not one."""
    return addmm(None, a, b)


def addmm(y: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """y + a @ b (a [M, K], b [K, N], y [M, N] or None for none), as one torch.addmm (or
    torch.mm) per part of M's split: each row's sums are those of the unsplit product."""
    rows = a.shape[0]
    if not needs_buckets(a) or bucket_rows(rows) == rows:
        return torch.mm(a, b) if y is None else torch.addmm(y, a, b)
    head = bucket_below(rows)
    out = a.new_empty(rows, b.shape[1])
    if y is None:
        torch.mm(a[:head], b, out=out[:head])
    else:
        torch.addmm(y[:head], a[:head], b, out=out[:head])
    tail, padded = rows - head, bucket_rows(rows - head)
    if y is None:
        out[head:] = torch.mm(_padded(a[head:], padded), b)[:tail]
    else:
        out[head:] = torch.addmm(_padded(y[head:], padded), _padded(a[head:], padded), b)[:tail]
    return out


def mm_over_rows(a: Tensor, b: Tensor) -> Tensor:
    """a^T @ b for a [M, P], b [M, Q]: a sum over M, split as mm splits it (the tail's rows
    padded with zeros, which add nothing); the tail's sum, rounded to the dtype once, is
    added to the head's inside addmm."""
    rows = a.shape[0]
    if not needs_buckets(a) or bucket_rows(rows) == rows:
        return torch.mm(a.t(), b)
    head = bucket_below(rows)
    padded = bucket_rows(rows - head)
    tail = torch.mm(_padded(a[head:], padded).t(), _padded(b[head:], padded))
    return torch.addmm(tail, a[:head].t(), b[:head])


def _padded(x: Tensor, rows: int) -> Tensor:
    return F.pad(x, (0, 0, 0, rows - x.shape[0]))
