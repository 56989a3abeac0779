import pytest
import torch

from wpn_dist.core.pooling import pool, position_weights


def test_position_weights_match_hand_computed_values():
    # Span of 3 tokens starting at position 1, then padding: weights 1/6, 2/6, 3/6.
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    assert torch.allclose(position_weights(mask), torch.tensor([[0, 1 / 6, 2 / 6, 3 / 6, 0]]))


def test_weighted_pool_is_the_hand_computed_weighted_sum():
    hidden = torch.tensor([[[1.0, 0.0], [2.0, 10.0], [4.0, 20.0], [8.0, 30.0]]])
    mask = torch.tensor([[0, 1, 1, 0]])  # positions 1 and 2: weights 1/3 and 2/3
    expected = torch.tensor([[(2.0 * 1 + 4.0 * 2) / 3, (10.0 * 1 + 20.0 * 2) / 3]])
    assert torch.allclose(pool(hidden, mask, "weighted"), expected)


def test_mean_and_last_pool():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert torch.allclose(pool(hidden, mask, "mean")[0], hidden[0, :3].mean(0))
    assert torch.allclose(pool(hidden, mask, "mean")[1], hidden[1, 2:].mean(0))
    assert torch.allclose(pool(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 3]]))


def test_padding_does_not_change_the_result():
    torch.manual_seed(0)
    hidden = torch.randn(1, 3, 4)
    padded = torch.cat([hidden, torch.randn(1, 5, 4) * 100], dim=1)
    mask = torch.tensor([[1, 1, 1]])
    padded_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]])
    for mode in ("weighted", "mean", "last"):
        assert torch.allclose(pool(hidden, mask, mode), pool(padded, padded_mask, mode), atol=1e-6)


def test_output_is_fp32_for_bf16_input():
    hidden = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    assert pool(hidden, torch.ones(2, 3), "weighted").dtype == torch.float32


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "max")
    with pytest.raises(ValueError, match="expects hidden"):
        pool(torch.zeros(2, 3), torch.ones(2, 3))
