"""Row counts rounded up to a bounded set, for half-precision matmuls on CPU.

On CPU, torch runs bfloat16/float16 matmuls through oneDNN, which compiles a kernel for every
shape it meets and keeps it for the life of the process (0.5-2 MB each; its primitive-cache
capacity does not bound them). A serving engine meets every row count from 1 to its token
budget, so memory grew by hundreds of MB to GBs. Rounding the rows up to a bucket (exact up to
16, then 8 buckets per doubling) bounds the shapes to about 8 per doubling of the token
budget, at the cost of fewer than 1/8 extra rows. float32 and CUDA need no padding.
"""

import torch
import torch.nn.functional as F

EXACT_ROWS = 16
_PADDED_DTYPES = (torch.bfloat16, torch.float16)


def bucket_rows(rows: int) -> int:
    """The bucket a row count runs in: rows itself up to EXACT_ROWS, else rounded up to a
    multiple of 1/16 of the next power of two (< 1/8 more rows)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << ((rows - 1).bit_length() - 4)
    return -(-rows // step) * step


def needs_buckets(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _PADDED_DTYPES


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over x's rows, padded to their bucket where the shape would otherwise be new."""
    rows = x.shape[0]
    if not needs_buckets(x) or (padded := bucket_rows(rows)) == rows:
        return F.linear(x, weight, bias)
    return F.linear(F.pad(x, (0, 0, 0, padded - rows)), weight, bias)[:rows]
