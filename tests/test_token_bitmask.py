"""The CPU bitmask application masks exactly what xgrammar's own kernel masks."""

import pytest
import torch
import xgrammar as xgr

from prefixcache.structured import TokenBitmask


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 3], [2]])
@pytest.mark.parametrize("vocab,width", [(770, 770), (100, 128), (64, 70)])
def test_cpu_mask_matches_xgrammar_kernel(rows, vocab, width):
    generator = torch.Generator().manual_seed(vocab + len(rows))
    logits = torch.randn(4, width, generator=generator)
    words = (vocab + 31) // 32
    bits = torch.randint(-(2**31), 2**31 - 1, (4, words), dtype=torch.int32, generator=generator)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bits, vocab_size=vocab, indices=rows)
    TokenBitmask(bits, rows, vocab).apply(logits)
    assert torch.equal(logits, expected)
    assert logits.isinf().any()  # the random masks forbid something


def test_bitmask_without_rows_leaves_logits_alone():
    logits = torch.randn(2, 64)
    expected = logits.clone()
    TokenBitmask(torch.zeros(2, 2, dtype=torch.int32), [], 64).apply(logits)
    assert torch.equal(logits, expected)
