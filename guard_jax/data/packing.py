"""Language-model training data: documents tokenized, joined with EOS, cut into fixed-length rows.

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import numpy as np


def pack(token_lists: list[list[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents, each followed by `eos_id`, into rows of `seq_len + 1` tokens.

    Row r holds the inputs `[:, :-1]` and targets `[:, 1:]` of one training sequence. The tail that does
    not fill a row is dropped. -> tokens_NS (int32), S = seq_len + 1.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    flat = np.fromiter((t for doc in token_lists for t in (*doc, eos_id)), np.int64)
    n = len(flat) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"{len(flat)} tokens cannot fill one row of {seq_len + 1}: use more text or a shorter seq_len")
    return flat[: n * (seq_len + 1)].reshape(n, seq_len + 1).astype(np.int32)


def batch_indices(num_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of batch `step`: epoch-wise permutations seeded by (seed, epoch), no row repeated within an epoch."""
    if not 0 < batch_size <= num_rows:
        raise ValueError(f"batch_size must be in [1, num_rows={num_rows}], got {batch_size}")
    per_epoch = num_rows // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return perm[k * batch_size : (k + 1) * batch_size]
