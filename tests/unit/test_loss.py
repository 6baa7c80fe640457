"""Value tests of the noise-aware DPO loss, the extrapolated log-probs and the rolling noise detector.

The loss under test is what a refine round computes per pair (`_production_loss`), checked against SPA Eq. 9
written independently in numpy (`_spa_eq9`).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from selfee_plugin.loss import NoiseDetector, compute_extrapolated_logps, compute_margins, linear_smoothing_term

BETA = 0.1


def _random_logps(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]


def _production_loss(chosen, rejected, ref_chosen, ref_rejected, noisy, beta, alpha):
    """Per pair, what a refine round trains on: TRL 1.9's sigmoid loss `-logsigmoid(beta * delta_score)` (its
    `delta_score` is `compute_margins`) plus `linear_smoothing_term` on the noisy pairs (`trainer._smoothing_term`)."""
    logits = beta * compute_margins(chosen, rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(logits) + linear_smoothing_term(logits, alpha * noisy.to(logits.dtype))


def _spa_eq9(chosen, rejected, ref_chosen, ref_rejected, noisy, beta, alpha):
    """Oracle, numpy float64: SPA Eq. 9, -(1 - a) log s(x) - a log s(-x), x = beta * z, a = alpha on noisy pairs."""
    lw, ll, rw, rl = (t.detach().double().numpy() for t in (chosen, rejected, ref_chosen, ref_rejected))
    x = beta * ((lw - rw) - (ll - rl))
    a = alpha * noisy.numpy().astype(np.float64)
    # log s(v) = -log(1 + e^-v)
    return torch.from_numpy((1 - a) * np.logaddexp(0.0, -x) + a * np.logaddexp(0.0, x))


def _naive_summed_logps(logits, labels, mask):
    logps = torch.gather(logits.log_softmax(-1), -1, labels.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def test_alpha_zero_equals_trl_sigmoid_loss():
    """With alpha = 0 (or no noisy pair) the loss is TRL's `-logsigmoid(beta * (chosen_lr - rejected_lr))`."""
    chosen, rejected, ref_chosen, ref_rejected = _random_logps(8)
    trl = -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    noisy = torch.tensor([True, False] * 4)
    alpha_zero = _production_loss(chosen, rejected, ref_chosen, ref_rejected, noisy, BETA, 0.0)
    assert_close(alpha_zero, trl, rtol=0, atol=0)
    assert_close(alpha_zero, _spa_eq9(chosen, rejected, ref_chosen, ref_rejected, noisy, BETA, 0.0))
    clean = torch.zeros(8, dtype=torch.bool)
    no_noisy = _production_loss(chosen, rejected, ref_chosen, ref_rejected, clean, BETA, 0.3)
    assert_close(no_noisy, trl, rtol=0, atol=0)
    assert_close(no_noisy, _spa_eq9(chosen, rejected, ref_chosen, ref_rejected, clean, BETA, 0.3))


def test_loss_hand_computed_on_mixed_batch():
    """z = (lw - ll) - (rw - rl); loss = -(1 - a*n) log s(bz) - a*n log s(-bz), s the sigmoid.

    Pair 0: z = (-1 - -3) - (-2 - -2) = 2, clean: -log s(0.2).
    Pair 1: z = (-4 - -2) - (-3 - -3) = -2, noisy, a = 0.25: -0.75 log s(-0.2) - 0.25 log s(0.2).
    Pair 2: z = 0, noisy: -0.75 log 0.5 - 0.25 log 0.5 = log 2.
    """
    chosen = torch.tensor([-1.0, -4.0, -5.0], dtype=torch.float64)
    rejected = torch.tensor([-3.0, -2.0, -5.0], dtype=torch.float64)
    ref_chosen = torch.tensor([-2.0, -3.0, -1.0], dtype=torch.float64)
    ref_rejected = torch.tensor([-2.0, -3.0, -1.0], dtype=torch.float64)
    noisy = torch.tensor([False, True, True])

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    expected = torch.tensor(
        [-log_sigmoid(0.2), -0.75 * log_sigmoid(-0.2) - 0.25 * log_sigmoid(0.2), math.log(2.0)], dtype=torch.float64
    )
    assert_close(_spa_eq9(chosen, rejected, ref_chosen, ref_rejected, noisy, BETA, 0.25), expected)
    got = _production_loss(chosen, rejected, ref_chosen, ref_rejected, noisy, BETA, 0.25)
    assert_close(got, expected)


def test_noisy_pair_gradient_points_less_towards_chosen():
    """Smoothing a noisy pair lowers d(-loss)/dz from beta*s(-bz) to beta*(s(-bz) - a) (SPA Eq. 9)."""
    chosen = torch.tensor([-1.0, -1.0], dtype=torch.float64, requires_grad=True)
    rejected, ref = torch.tensor([-1.0, -1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    loss = _production_loss(chosen, rejected, ref, ref, torch.tensor([False, True]), BETA, 0.1)
    loss.sum().backward()
    assert_close(chosen.grad, torch.tensor([-BETA * 0.5, -BETA * (0.5 - 0.1)], dtype=torch.float64))


def test_detector_appends_before_thresholding():
    """The first batch's own values set tau: [1..5] with K = 0.2 gives np.quantile = 1.8, flagging only 1."""
    detector = NoiseDetector(window=50, noisy_fraction=0.2)
    noisy, tau = detector.update(torch.tensor([3.0, 1.0, 5.0, 2.0, 4.0]))
    assert tau == pytest.approx(1.8)
    assert noisy.tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("window,fraction", [(7, 0.3), (50, 0.1), (3, 0.5)])
def test_detector_matches_numpy_rolling_quantile(window, fraction):
    """lambda = 0, so beta * z~ = beta * z: over many steps of varying batch size, the flagged set is exactly
    `scores <= np.quantile(last W of all scores so far, including this batch, K)` (numpy's default 'linear')."""
    detector = NoiseDetector(window=window, noisy_fraction=fraction)
    seen = []
    for step in range(12):
        n = 1 + step % 5
        chosen, rejected, ref_chosen, ref_rejected = _random_logps(n, seed=step)
        scores = (BETA * compute_margins(chosen, rejected, ref_chosen, ref_rejected)).float()
        noisy, tau = detector.update(scores)

        seen.extend(scores.double().tolist())
        expected_tau = np.quantile(np.array(seen[-window:]), fraction)
        expected = scores.double().numpy() <= expected_tau
        assert tau == pytest.approx(expected_tau, abs=1e-12)
        assert noisy.tolist() == expected.tolist()
    assert len(detector.values) == min(window, len(seen))


def test_detector_zero_fraction_flags_nothing_and_eval_does_not_update():
    detector = NoiseDetector(window=4, noisy_fraction=0.0)
    noisy, tau = detector.update(torch.tensor([1.0, 2.0]))
    assert not noisy.any() and tau == 1.0
    detector = NoiseDetector(window=4, noisy_fraction=0.5)
    assert detector.threshold() is None and not detector.flag(torch.tensor([-9.0])).any()
    detector.update(torch.tensor([1.0, 2.0, 3.0]))
    assert detector.flag(torch.tensor([1.5, 2.5])).tolist() == [True, False]
    assert list(detector.values) == [1.0, 2.0, 3.0]


def test_detector_gathers_across_processes():
    """Every process appends the gathered values (rank order), so tau is shared; only local pairs are flagged."""
    other_rank = torch.tensor([-10.0, -9.0])
    detector = NoiseDetector(window=10, noisy_fraction=0.25)
    local = torch.tensor([0.0, 1.0])
    noisy, tau = detector.update(local, gather=lambda t: torch.cat([other_rank, t]))
    assert list(detector.values) == [-10.0, -9.0, 0.0, 1.0]
    assert tau == pytest.approx(np.quantile([-10.0, -9.0, 0.0, 1.0], 0.25))
    assert noisy.tolist() == [False, False]


def test_detector_state_dict_roundtrip():
    detector = NoiseDetector(window=3, noisy_fraction=0.1)
    detector.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    state = json.loads(json.dumps(detector.state_dict()))
    restored = NoiseDetector(window=3, noisy_fraction=0.1)
    restored.load_state_dict(state)
    assert list(restored.values) == [2.0, 3.0, 4.0]
    assert restored.threshold() == detector.threshold()
    restored.reset()
    assert restored.threshold() is None


@pytest.mark.parametrize("extrapolation,chunk_size", [(0.0, 1), (0.7, 1), (2.0, 3)])
def test_extrapolated_logps_match_naive_formula(extrapolation, chunk_size):
    """compute_extrapolated_logps = sum over completion of log_softmax((1+l) h - l h_ref)[label], no gradient."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 11, generator=g, requires_grad=True)
    ref_logits = torch.randn(4, 5, 11, generator=g)
    labels = torch.randint(0, 11, (4, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    got = compute_extrapolated_logps(logits, ref_logits, labels, mask, extrapolation, chunk_size=chunk_size)
    expected = _naive_summed_logps((1 + extrapolation) * logits - extrapolation * ref_logits, labels, mask)
    assert not got.requires_grad
    assert_close(got, expected.detach())


def _constructed_pairs():
    """Four pairs, one completion token each, vocabulary {0, 1}, every label 0, reference logits [0, 0].

    With policy logits [d, 0], log pi(0) = log s(d), s the sigmoid, and log pi_ref(0) = log 1/2.
    - "up":    chosen d = +4, rejected d = 0:  z = log s(4) + log 2 = 0.675
    - "down":  chosen d = 0,  rejected d = -1: z = -(log s(-1) + log 2) = 0.620
    - two clean pairs, chosen d = +6/+5, rejected d = -6/-5: z = 6 and 5.
    At lambda = 1 the logits double: "up" saturates (log s(8) + log 2 = 0.693, it cannot exceed log 2), while "down"
    keeps growing (-(log s(-2) + log 2) = 1.434). So token-level extrapolation must move the lowest margin from
    "down" to "up". On summed log-probs, extrapolation gives (1 + lambda) * z: same order, same flagged pair.
    """
    chosen_d = torch.tensor([4.0, 0.0, 6.0, 5.0])
    rejected_d = torch.tensor([0.0, -1.0, -6.0, -5.0])
    d = torch.cat([chosen_d, rejected_d])  # (2B,): [chosen; rejected]
    logits = torch.stack([d, torch.zeros_like(d)], dim=-1).unsqueeze(1)  # (2B, T=1, V=2)
    ref_logits = torch.zeros_like(logits)
    labels = torch.zeros(8, 1, dtype=torch.long)
    mask = torch.ones(8, 1, dtype=torch.long)
    return logits, ref_logits, labels, mask


def _flag(scores, window=4, fraction=0.1):
    return NoiseDetector(window=window, noisy_fraction=fraction).update(scores)[0]


def test_extrapolating_logits_changes_flags_but_summed_logps_do_not():
    logits, ref_logits, labels, mask = _constructed_pairs()
    policy = compute_extrapolated_logps(logits, ref_logits, labels, mask, 0.0)
    ref = compute_extrapolated_logps(ref_logits, ref_logits, labels, mask, 0.0)
    chosen, rejected = policy.chunk(2)  # (2B,) -> (B,), (B,)
    ref_chosen, ref_rejected = ref.chunk(2)
    z = compute_margins(chosen, rejected, ref_chosen, ref_rejected)
    assert_close(z, torch.tensor([0.6750, 0.6201, 6.0, 5.0]), atol=2e-4, rtol=0)

    flagged_z = _flag(BETA * z)
    assert flagged_z.tolist() == [False, True, False, False]  # lambda = 0: "down" has the lowest margin

    lam = 1.0
    ext_chosen, ext_rejected = compute_extrapolated_logps(logits, ref_logits, labels, mask, lam).chunk(2)
    z_ext = compute_margins(ext_chosen, ext_rejected, ref_chosen, ref_rejected)
    assert_close(z_ext, torch.tensor([0.6928, 1.4338, 12.0, 10.0]), atol=2e-4, rtol=0)
    assert _flag(BETA * z_ext).tolist() == [True, False, False, False]  # token level: "up" is now flagged

    # Extrapolating summed log-probs instead: (1+l)(lw - ll) - l(rw - rl) - (rw - rl) = (1+l) z, a rescaling.
    z_summed = compute_margins((1 + lam) * chosen - lam * ref_chosen, (1 + lam) * rejected - lam * ref_rejected,
                               ref_chosen, ref_rejected)
    assert_close(z_summed, (1 + lam) * z)
    assert _flag(BETA * z_summed).tolist() == flagged_z.tolist()


@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_clean_pair_loss_does_not_depend_on_lambda(lam):
    """lambda only changes which pairs are flagged; a clean pair's loss is -log s(beta z) whatever lambda is."""
    logits, ref_logits, labels, mask = _constructed_pairs()
    chosen, rejected = compute_extrapolated_logps(logits, ref_logits, labels, mask, 0.0).chunk(2)
    ref_chosen, ref_rejected = compute_extrapolated_logps(ref_logits, ref_logits, labels, mask, 0.0).chunk(2)
    ext_chosen, ext_rejected = compute_extrapolated_logps(logits, ref_logits, labels, mask, lam).chunk(2)

    losses = {}
    for name, (c, r) in {"lambda=0": (chosen, rejected), "lambda>0": (ext_chosen, ext_rejected)}.items():
        noisy = _flag(BETA * compute_margins(c, r, ref_chosen, ref_rejected))
        losses[name] = (noisy, _production_loss(chosen, rejected, ref_chosen, ref_rejected, noisy, BETA, 0.1))
    plain = -F.logsigmoid(BETA * compute_margins(chosen, rejected, ref_chosen, ref_rejected))
    for noisy, loss in losses.values():
        assert_close(loss[~noisy], plain[~noisy])
    both_clean = ~losses["lambda=0"][0] & ~losses["lambda>0"][0]
    assert both_clean.sum() >= 2
    assert_close(losses["lambda=0"][1][both_clean], losses["lambda>0"][1][both_clean])
