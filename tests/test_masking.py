import torch

from iomm.conditioning.masking import random_keep_mask, zero_masked
from iomm.conditioning.sequence import Segment, pack_left, positions_after


def test_mask_ratio_in_expectation_and_per_sample():
    g = torch.Generator().manual_seed(0)
    keep = random_keep_mask(4000, 64, 0.85, min_keep=0, generator=g)
    assert abs(keep.float().mean().item() - 0.15) < 0.005
    per_sample = keep.float().mean(1)
    # Bernoulli per token, per sample: the per-sample keep fraction varies like a binomial.
    expected_std = (0.15 * 0.85 / 64) ** 0.5
    assert abs(per_sample.std().item() - expected_std) < 0.2 * expected_std
    assert len({tuple(row.tolist()) for row in keep[:100]}) == 100


def test_min_keep_guards_fully_masked_images():
    g = torch.Generator().manual_seed(1)
    keep = random_keep_mask(500, 16, 0.99, min_keep=1, generator=g)
    assert keep.sum(1).min().item() >= 1
    unguarded = random_keep_mask(500, 16, 0.99, min_keep=0, generator=torch.Generator().manual_seed(1))
    assert (unguarded.sum(1) == 0).any()


def test_zero_mode_zeroes_masked_tokens_in_place():
    tokens = torch.randn(2, 5, 3)
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    out = zero_masked(tokens, keep)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    assert torch.equal(out[keep], tokens[keep])


def test_pack_left_keeps_positions_of_dropped_tokens():
    d = 2
    text = Segment(torch.ones(2, 3, d), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    image_tokens = torch.arange(2 * 4 * d, dtype=torch.float).view(2, 4, d)
    keep = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    image = Segment(image_tokens, keep, counts_position=torch.ones(2, 4, dtype=torch.bool))
    packed = pack_left([text, image])
    # Row 0: 2 text + 2 kept image tokens (4 valid); row 1: 3 text + 1 kept -> both 4 long, no padding.
    assert packed.mask.all()
    assert packed.positions[0].tolist() == [0, 1, 2, 5]  # image tokens 0 and 3 sit at positions 2 and 5
    assert packed.positions[1].tolist() == [0, 1, 2, 4]
    assert torch.equal(packed.embeds[0, 2], image_tokens[0, 0]) and torch.equal(packed.embeds[0, 3], image_tokens[0, 3])
    queries = positions_after(packed, 3)
    assert queries[0].tolist() == [6, 7, 8]
    assert queries[1].tolist() == [5, 6, 7]


def test_pack_left_pads_on_the_left():
    seg = Segment(torch.randn(2, 4, 3), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool))
    packed = pack_left([seg])
    assert packed.mask.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert torch.equal(packed.embeds[0, 2:], seg.embeds[0, :2])
    assert packed.next_position.tolist() == [2, 4]
