import numpy as np
import pytest

from guard_jax.data.packing import batch_indices, pack


def test_pack_joins_documents_with_eos_and_drops_the_tail():
    rows = pack([[1, 2, 3], [4, 5], [6]], seq_len=3, eos_id=0)
    np.testing.assert_array_equal(rows, [[1, 2, 3, 0], [4, 5, 0, 6]])
    with pytest.raises(ValueError, match="cannot fill one row"):
        pack([[1]], seq_len=8, eos_id=0)


def test_batches_are_a_function_of_seed_and_step():
    a = [batch_indices(10, 3, seed=1, step=s) for s in range(3)]
    assert len(set(np.concatenate(a))) == 9  # one epoch: no repeats
    np.testing.assert_array_equal(batch_indices(10, 3, 1, 4), batch_indices(10, 3, 1, 4))
    assert not np.array_equal(batch_indices(10, 3, 1, 0), batch_indices(10, 3, 2, 0))
