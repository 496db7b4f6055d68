"""The constraint bitmask layout (dsv3.inference.constraint) against xgrammar's, which grammar constraints fill."""

import pytest
import torch

from dsv3.inference.constraint import allowed_from_bitmask, bitmask_from_allowed, bitmask_words, mask_logits


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 1000])
def test_bitmask_round_trip(vocab):
    allowed = torch.rand(3, vocab, generator=torch.Generator().manual_seed(vocab)) > 0.5
    allowed[:, -1] = True  # the sign bit of the last word when vocab % 32 == 0
    bitmask = bitmask_from_allowed(allowed)
    assert bitmask.shape == (3, bitmask_words(vocab)) and bitmask.dtype == torch.int32
    assert torch.equal(allowed_from_bitmask(bitmask, vocab), allowed)


def test_masking_equals_xgrammars():
    xgr = pytest.importorskip("xgrammar")
    allowed = torch.rand(4, 300, generator=torch.Generator().manual_seed(0)) > 0.7
    bitmask = bitmask_from_allowed(allowed)
    assert xgr.get_bitmask_shape(4, 300) == tuple(bitmask.shape)
    logits = torch.randn(4, 300)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    assert torch.equal(mask_logits(logits, bitmask), expected)
    assert torch.equal(torch.isfinite(mask_logits(logits, bitmask)), allowed)
