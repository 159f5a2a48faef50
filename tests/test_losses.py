"""The math of one step on hand-built tensors: losses, pairing, EOS cut, masks, log-probs, β."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.logprobs import left_truncate, masked_sum, token_logps, truncate_after_eos
from trainer.losses import beta_for_epoch, dpo_losses, select_pairs

# ----------------------------------------------------------------------------- losses

# Two pairs: logits = (π_c − π_r) − (ref_c − ref_r) = [2, −1].
CHOSEN = torch.tensor([-1.0, -2.0])
REJECTED = torch.tensor([-3.0, -1.0])
REF_CHOSEN = torch.tensor([-2.0, -2.5])
REF_REJECTED = torch.tensor([-2.0, -2.5])


def test_sigmoid_loss_matches_hand_values() -> None:
    beta = 0.5
    got = dpo_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta, "sigmoid")
    # −log σ(x) = log(1 + e^−x), with x = β·logits = [1, −0.5].
    want = torch.tensor([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_ipo_loss_matches_hand_values() -> None:
    beta = 0.25  # 1 / (2β) = 2
    got = dpo_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta, "ipo")
    torch.testing.assert_close(got, torch.tensor([(2.0 - 2.0) ** 2, (-1.0 - 2.0) ** 2]))


def test_loss_only_depends_on_the_log_ratio_difference() -> None:
    shift = torch.tensor([5.0, -3.0])  # the same shift on every sequence of a pair
    base = dpo_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.1)
    shifted = dpo_losses(CHOSEN + shift, REJECTED + shift, REF_CHOSEN, REF_REJECTED, 0.1)
    torch.testing.assert_close(base, shifted)
    # Swapping chosen and rejected flips the sign of the logits: −logσ(x) − (−logσ(−x)) = −x.
    swapped = dpo_losses(REJECTED, CHOSEN, REF_REJECTED, REF_CHOSEN, 0.1)
    torch.testing.assert_close(base - swapped, -0.1 * torch.tensor([2.0, -1.0]))


def test_unknown_loss_type_is_refused() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        dpo_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, 0.1, "hinge")


# ----------------------------------------------------------------------------- pairs


def trl_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's rule, copied from ``OnlineDPOTrainer.training_step``."""
    batch_size = rewards.numel() // 2
    first_half, second_half = rewards.split(batch_size)
    mask = first_half >= second_half
    batch_range = torch.arange(batch_size)
    return batch_range + (~mask * batch_size), batch_range + (mask * batch_size)


def test_two_samples_pick_the_higher_reward_and_ties_go_to_sample_0() -> None:
    # Block layout, B = 3: [s0p0, s0p1, s0p2, s1p0, s1p1, s1p2].
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 0.5])
    pairs = select_pairs(rewards, 2)
    assert pairs.chosen.tolist() == [0, 4, 2]
    assert pairs.rejected.tolist() == [3, 1, 5]
    assert pairs.tied.tolist() == [False, False, True]


def test_two_samples_follow_trls_rule() -> None:
    generator = torch.Generator().manual_seed(0)
    # Rewards on a coarse grid: many ties.
    rewards = torch.randint(0, 3, (64,), generator=generator).float()
    pairs = select_pairs(rewards, 2)
    chosen, rejected = trl_pairs(rewards)
    assert pairs.chosen.tolist() == chosen.tolist()
    assert pairs.rejected.tolist() == rejected.tolist()
    assert pairs.tied.tolist() == (rewards[:32] == rewards[32:]).tolist()


def test_four_samples_pair_best_against_worst() -> None:
    # K = 4, B = 2: sample k of prompt i at k·2 + i.
    grid = torch.tensor(
        [
            [0.1, 0.3],  # sample 0
            [0.9, 0.3],  # sample 1
            [0.9, 0.3],  # sample 2
            [0.1, 0.3],  # sample 3
        ]
    )
    pairs = select_pairs(grid.flatten(), 4)
    # Prompt 0: the first best (sample 1) against the last worst (sample 3).
    # Prompt 1: all tied: sample 0 against sample 3, flagged as tied.
    assert pairs.chosen.tolist() == [1 * 2 + 0, 0 * 2 + 1]
    assert pairs.rejected.tolist() == [3 * 2 + 0, 3 * 2 + 1]
    assert pairs.tied.tolist() == [False, True]


def test_four_samples_random_rewards() -> None:
    generator = torch.Generator().manual_seed(1)
    k, b = 4, 16
    rewards = torch.randn(k * b, generator=generator)
    pairs = select_pairs(rewards, k)
    grid = rewards.view(k, b)
    torch.testing.assert_close(rewards[pairs.chosen], grid.max(0).values)
    torch.testing.assert_close(rewards[pairs.rejected], grid.min(0).values)
    assert not pairs.tied.any()
    assert ((pairs.chosen % b) == torch.arange(b)).all()  # each pair stays within its prompt
    assert ((pairs.rejected % b) == torch.arange(b)).all()


def test_select_pairs_refuses_a_bad_shape() -> None:
    with pytest.raises(ValueError, match="K=4"):
        select_pairs(torch.zeros(6), 4)


# ----------------------------------------------------------------------------- EOS and masks


def test_truncate_after_eos_keeps_the_first_eos_of_any_id() -> None:
    eos, other_eos, pad = 2, 9, 0
    ids = torch.tensor(
        [
            [5, eos, 7, eos],  # second EOS and the token before it become padding
            [5, 6, 7, 8],  # no EOS: untouched
            [4, other_eos, eos, 5],  # the second EOS id ends it too
            [eos, 5, 5, 5],  # EOS first: only the EOS stays
        ]
    )
    cut, mask = truncate_after_eos(ids, [eos, other_eos], pad)
    assert cut.tolist() == [[5, eos, 0, 0], [5, 6, 7, 8], [4, other_eos, 0, 0], [eos, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]


def test_truncate_after_eos_matches_trl() -> None:
    from trl.experimental.utils import truncate_right

    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 12, (32, 10), generator=generator)
    ids[ids == 7] = 2  # some rows with one, several or no EOS
    ids[ids == 11] = 9
    ours = truncate_after_eos(ids, [2, 9], 0)
    theirs = truncate_right(ids, [2, 9], 0)
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1].long())


def test_masked_sum() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]])
    assert masked_sum(values, mask).tolist() == [3.0, 0.0, 7.0]


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_logps_equals_log_softmax_gather(scale: float, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 5, 50, generator=generator) * scale).to(dtype)
    ids = torch.randint(0, 50, (3, 5), generator=generator)
    want = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logps(logits, ids), want)


def test_left_truncate_drops_leftmost_columns_and_keeps_one_prompt_token() -> None:
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = (ids != 0).long()
    kept_ids, kept_mask = left_truncate(ids, mask, completion_len=3, max_length=5)
    assert kept_ids.tolist() == [[5, 6], [9, 10]]
    assert kept_mask.tolist() == [[1, 1], [1, 1]]
    kept_ids, _ = left_truncate(ids, mask, completion_len=4, max_length=5)
    assert kept_ids.tolist() == [[6], [10]]
    kept_ids, _ = left_truncate(ids, mask, completion_len=2, max_length=100)
    assert torch.equal(kept_ids, ids)
    with pytest.raises(ValueError, match="max_length"):
        left_truncate(ids, mask, completion_len=5, max_length=5)


# ----------------------------------------------------------------------------- beta


def test_beta_float_is_constant() -> None:
    assert beta_for_epoch(0.3, None) == 0.3
    assert beta_for_epoch(0.3, 7.5) == 0.3


@pytest.mark.parametrize(
    ("epoch", "want"),
    [(None, 0.1), (0.0, 0.1), (0.99, 0.1), (1.0, 0.2), (1.5, 0.2), (2.0, 0.3), (2.7, 0.3),
     (3.0, 0.3), (10.25, 0.3)],
)  # fmt: skip
def test_beta_list_uses_the_epochs_integer_part_then_the_last(
    epoch: float | None, want: float
) -> None:
    assert beta_for_epoch([0.1, 0.2, 0.3], epoch) == want


def test_sigmoid_loss_gradient_is_beta_sigmoid() -> None:
    """d/dπ_c of −logσ(β·logits) = −β·σ(−β·logits): the DPO weight."""
    chosen = CHOSEN.clone().requires_grad_(True)
    beta = 0.5
    dpo_losses(chosen, REJECTED, REF_CHOSEN, REF_REJECTED, beta).sum().backward()
    logits = torch.tensor([2.0, -1.0])
    torch.testing.assert_close(chosen.grad, -beta * F.sigmoid(-beta * logits))
