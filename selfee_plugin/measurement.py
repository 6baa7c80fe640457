"""What the round loop measures around a round's training, without gold: held-out judge accuracy, the round's own
pairs re-scored by pi_t, and a length/KL probe of answers sampled after the round (the guard reads them)."""

from __future__ import annotations

from . import distributed
from . import metric_keys as keys
from .diagnostics import post_round_signals
from .formatting import format_completion, tokenize_completion
from .generation import make_sampler
from .judge import judge_accuracy, rescore_rows, score_sequences
from .logprobs import Scorer
from .references import dpo_reference


class RoundMeasurement:
    """Measurements of the trainer's current policy, each rank scoring its shard and every rank getting the result.

    Args:
        trainer: the SelfeeDPOTrainer (its policy, tokenizer and DPO reference).
        selfee: the `selfee:` block.
        eval_rows: held-out human pairs (`RunContext.eval_rows`), or None.
        judge_reference: pi_init for the judge (`references.init_judge_reference`).
    """

    def __init__(self, trainer, selfee, eval_rows: list[dict] | None, judge_reference):
        self.trainer, self.selfee, self.eval_rows, self.judge_reference = trainer, selfee, eval_rows, judge_reference
        self.tokenizer = trainer.processing_class
        self.scorer = Scorer.for_run(self.tokenizer, selfee.judge, trainer.args.max_length)

    @property
    def model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def judge_accuracy(self) -> dict:
        """Held-out judge accuracy under the current policy (empty without `judge.eval_pairs`)."""
        if not self.eval_rows:
            return {}
        rows = distributed.shard(self.eval_rows, distributed.rank(), distributed.world_size())
        accuracy = judge_accuracy(self.model, self.tokenizer, rows, self.scorer, self.judge_reference,
                                  self.selfee.judge.length_normalize)
        accuracy = distributed.weighted_mean(distributed.gather((accuracy, len(rows))))
        return {keys.JUDGE_ACCURACY: accuracy, keys.JUDGE_EVAL_PAIRS: len(self.eval_rows)}

    def after_round(self, round_idx: int, rows: list[dict]) -> dict:
        """Signals of pi_t after round t: the round's trained rows re-scored (`diagnostics.post_round_signals`),
        the length probe, and held-out judge accuracy."""
        mine = distributed.shard(list(range(len(rows))), distributed.rank(), distributed.world_size())
        scores = rescore_rows(self.model, self.tokenizer, [rows[i] for i in mine], self.scorer)
        after = [None] * len(rows)
        for part in distributed.gather(list(zip(mine, scores))):
            for i, logps in part:
                after[i] = logps
        signals = post_round_signals(rows, after)
        signals.update(self.length_probe(round_idx, rows))
        accuracy = self.judge_accuracy()
        if accuracy:
            signals[keys.JUDGE_ACCURACY_AFTER] = accuracy[keys.JUDGE_ACCURACY]
        return signals

    def length_probe(self, round_idx: int, rows: list[dict]) -> dict:
        """Answers sampled from pi_t for the round's first `guard.probe_prompts` prompts, against the round's own
        samples of them (from pi_{t-1}, same settings): does the round make answers longer or cut them off? The same
        samples, scored under pi_t, pi_{t-1} and pi_init, estimate KL(pi_t || pi_{t-1}) and KL(pi_t || pi_init)."""
        selfee, tokenizer, model = self.selfee, self.tokenizer, self.model
        probe = [row for row in rows if row.get("responses")][: selfee.guard.probe_prompts]
        if not probe:
            return {}
        mine = distributed.shard(probe, distributed.rank(), distributed.world_size())
        gens = make_sampler(model, tokenizer, selfee.generation).generate(
            [row["messages"] for row in mine], selfee.samples_per_prompt, selfee.generation.seed + round_idx
        )

        def tokens(texts):
            return [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]

        before, after, cut, sequences = [], [], [], []
        for row, prompt, responses, finished in zip(mine, gens.prompts, gens.responses, gens.finished):
            if responses is not None:
                before, after, cut = before + tokens(row["responses"]), after + tokens(responses), cut + finished
                sequences += [tokenize_completion(tokenizer, prompt, format_completion(tokenizer, t)) for t in responses]
        kl_init, kl_prev = [], []
        if sequences:
            now, init, _, _ = score_sequences(model, sequences, self.scorer, self.judge_reference)
            kl_init = (now - init).tolist()
            if selfee.dpo_reference == "previous":  # the DPO reference (`ref` snapshot or frozen copy) is pi_{t-1}
                _, prev, _, _ = score_sequences(model, sequences, self.scorer, dpo_reference(self.trainer))
                kl_prev = (now - prev).tolist()
        parts = distributed.gather((before, after, cut, kl_init, kl_prev))
        before, after, cut, kl_init, kl_prev = (sum(part, []) for part in zip(*parts))
        if not before:
            return {}
        mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
        signals = {
            keys.PROBE_LENGTH_BEFORE: mean_before,
            keys.PROBE_LENGTH_AFTER: mean_after,
            keys.LENGTH_GROWTH: mean_after / mean_before - 1 if mean_before else 0.0,
            keys.PROBE_TRUNCATED_AFTER: sum(not f for f in cut) / len(cut),
        }
        if kl_init:
            signals[keys.KL_INITIAL_PROBE] = sum(kl_init) / len(kl_init)
        if kl_prev:
            signals[keys.KL_PREVIOUS_PROBE] = sum(kl_prev) / len(kl_prev)
        return signals
