"""Noise-aware DPO loss: de-coupled noise detection (extrapolated margins, rolling quantile), noisy-pair smoothing."""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from ._logging import get_logger
from .logprobs import sequence_logps

LOG = get_logger(__name__)


def compute_margins(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """DPO margin z of each pair (SPA Eq. 2), in TRL's order of operations.

    Args:
        chosen_logps: (B,) summed completion log-probs of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) summed log-probs of the chosen responses under the reference.
        ref_rejected_logps: (B,) the same for the rejected responses.

    Returns:
        (B,) z = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)].
    """
    # Same grouping as TRL's `chosen_logratios - rejected_logratios`, so alpha = 0 is bit-identical to TRL.
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    return chosen_logratios - rejected_logratios


def linear_smoothing_term(logits: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """(B,) a * x: what label smoothing with weight a adds to the sigmoid DPO loss -logsig(x) of a pair with logit x.

    SPA Eq. 9 trains a noisy pair towards P(y_w > y_l) = 1 - a instead of 1: -(1 - a) logsig(x) - a logsig(-x), which
    equals -logsig(x) + a x. So a refine round keeps TRL's sigmoid loss and adds this term (see `SelfeeDPOTrainer`).
    """
    return weight * logits


@torch.no_grad()
def compute_extrapolated_logps(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    completion_mask: torch.Tensor,
    extrapolation: float,
    chunk_size: int = 1,
) -> torch.Tensor:
    """Summed completion log-probs under the extrapolated policy pi~ (SPA Eq. 8), without gradient.

    The extrapolation acts on logits, token by token: h~ = (1 + lambda) * h_theta - lambda * h_ref, then
    log_softmax. On summed log-probs it would collapse to (1 + lambda) * z and flag the same pairs.

    Args:
        logits: (N, T, V) policy logits already shifted to predict `labels` (N = 2B, `[chosen; rejected]`).
        ref_logits: (N, T, V) reference logits, same alignment.
        labels: (N, T) next-token ids.
        completion_mask: (N, T) 1 on completion tokens, 0 on prompt and padding.
        extrapolation: lambda >= 0; 0 gives the policy's own log-probs.
        chunk_size: sequences processed at once; bounds the extra (chunk, T, V) tensors alive at a time.

    Returns:
        (N,) float32 summed log pi~ over each completion.
    """
    sums = []
    for start in range(0, logits.shape[0], chunk_size):
        end = start + chunk_size
        # float32: in bf16 the difference of two scaled logit tensors loses the small shifts that matter here.
        h_ext = (1 + extrapolation) * logits[start:end].detach().float() - extrapolation * ref_logits[start:end].float()
        sums.append(sequence_logps(h_ext, labels[start:end], completion_mask[start:end]))  # SPA Eq. 8 on (c, T, V)
        del h_ext
    return torch.cat(sums)


class NoiseDetector:
    """Rolling window of the last W values of beta * z~ and the K-quantile threshold that flags noisy pairs.

    Order within a step (SPA reference code; SPA Eq. 8-9: keep the last W values of beta * z~ seen in training):
    the current batch's values are appended to the window *first*, then tau is the K-quantile of the window,
    and a pair is noisy when beta * z~ <= tau. So the first step is well defined (its own batch sets tau), and a
    batch larger than W keeps only its last W values in the window, while every pair is still compared to tau.

    The quantile is `torch.quantile`'s default linear interpolation (the same as `numpy.quantile`'s default).
    K = 0 flags nothing (tau is still reported). Values are kept as Python floats, so the state is small and
    JSON-serialisable for checkpoints.

    Args:
        window: W, how many recent values set the threshold.
        noisy_fraction: K in [0, 1), the quantile taken.
    """

    def __init__(self, window: int = 50, noisy_fraction: float = 0.1):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 <= noisy_fraction < 1.0:
            raise ValueError(f"noisy_fraction must be in [0, 1), got {noisy_fraction}")
        self.noisy_fraction = noisy_fraction
        self.values: deque[float] = deque(maxlen=window)

    @property
    def window(self) -> int:
        return self.values.maxlen

    def reset(self) -> None:
        """Empty the window (each round starts its own, since margins change scale with the reference)."""
        self.values.clear()

    def threshold(self) -> float | None:
        """tau, the K-quantile of the window; None while the window is empty."""
        if not self.values:
            return None
        window = torch.tensor(list(self.values), dtype=torch.float64)
        return torch.quantile(window, self.noisy_fraction).item()

    def flag(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) bool: scores <= tau, against the current window, without changing it (evaluation)."""
        tau = self.threshold()
        if tau is None or self.noisy_fraction == 0.0:
            return torch.zeros_like(scores, dtype=torch.bool)
        return scores.detach().double() <= tau

    def update(
        self, scores: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, float]:
        """Append this step's scores to the window, then flag this process's pairs against the new tau.

        Args:
            scores: (B,) beta * z~ of this process's pairs.
            gather: the accelerator's `gather`, so every process appends the same values in rank order and so
                shares one window and one tau under data parallelism. None on a single process.

        Returns:
            noisy: (B,) bool, on the device of `scores`.
            tau: the threshold used.
        """
        scores = scores.detach()
        everyone = gather(scores) if gather is not None else scores  # (B * world,)
        self.values.extend(everyone.double().cpu().tolist())
        return self.flag(scores), self.threshold()

    def state_dict(self) -> dict:
        """JSON-serialisable state, saved with each checkpoint."""
        return {"window": self.window, "noisy_fraction": self.noisy_fraction, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; a different W keeps the most recent values that fit."""
        if state.get("window", self.window) != self.window:
            LOG.warning(
                f"Noise window was {state['window']} in the checkpoint, now {self.window}; keeping the last values."
            )
        self.values.clear()
        self.values.extend(float(v) for v in state["values"])
