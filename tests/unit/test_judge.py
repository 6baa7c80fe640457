"""Tests for selfee_plugin.judge: pair math, log-probs against TRL and references, judge accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BETA, LORA_TARGETS, MESSAGES, _dpo_trainer, _lora, _plain_logp, _randomize_lora_b, _sequences

from selfee_plugin.formatting import format_completion, format_prompt, pad_token_id, tokenize_completion
from selfee_plugin.judge import judge_accuracy, load_eval_pairs, score_sequences
from selfee_plugin.logprobs import Scorer, completion_logps
from selfee_plugin.pairing import judge_pairs, valid_responses

# ----------------------------------------------------------------------------------------------- pure math


def test_chosen_is_higher_reward_and_probability_is_sigmoid_beta_margin():
    """r = pi - ref: row 0 -> [1, -1] (chosen 0, margin 2); row 1 -> [-0.5, 0.25] (chosen 1, margin 0.75)."""
    policy = torch.tensor([[-1.0, -3.0], [-4.0, -2.0]])
    ref = torch.tensor([[-2.0, -2.0], [-3.5, -2.25]])
    out = judge_pairs(policy, ref, BETA)
    assert out.chosen_index.tolist() == [0, 1] and out.rejected_index.tolist() == [1, 0]
    torch.testing.assert_close(out.margins, torch.tensor([2.0, 0.75], dtype=torch.float64))
    torch.testing.assert_close(out.probabilities, torch.sigmoid(BETA * torch.tensor([2.0, 0.75], dtype=torch.float64)))
    assert out.paired.all()


def test_length_normalized_reward_is_per_token_mean():
    """Summed r = [2, 3] picks 1; per token (lengths 2, 6) r = [1, 0.5] picks 0 with margin 0.5."""
    policy, ref, lengths = torch.tensor([[2.0, 3.0]]), torch.zeros(1, 2), torch.tensor([[2, 6]])
    assert judge_pairs(policy, ref, BETA, completion_lengths=lengths).chosen_index.item() == 1
    out = judge_pairs(policy, ref, BETA, completion_lengths=lengths, length_normalize=True)
    assert out.chosen_index.item() == 0
    torch.testing.assert_close(out.margins, torch.tensor([0.5], dtype=torch.float64))


def test_ties_empty_and_identical_are_counted_not_paired():
    """Row 0 ties exactly (r = [1, 1]); row 1 has an empty answer; row 2 two identical answers; n=4 rows survive a
    duplicate or an empty answer as long as two distinct non-empty answers remain."""
    valid, reasons = valid_responses([["a b", "c"], ["a", ""], ["same", "same"]])
    assert reasons == [None, "empty_response", "identical_responses"]
    assert valid.tolist() == [[True, True], [True, False], [True, False]]
    out = judge_pairs(torch.tensor([[0.0, 0.0], [5.0, 0.0], [5.0, 0.0]]), torch.tensor([[-1.0, -1.0]] * 3), BETA, valid)
    assert out.paired.tolist() == [False, False, False]
    tied = valid.sum(1).ge(2) & ~out.paired  # two valid answers, neither below the best: a reward tie
    assert tied.tolist() == [True, False, False]
    assert out.chosen_index.tolist() == [-1, -1, -1]

    valid, reasons = valid_responses([["x", "x", "", "y"], ["", "", "", "z"], ["q", "q", "q", "q"]])
    assert reasons == [None, "empty_response", "identical_responses"]
    assert valid[0].tolist() == [True, False, False, True]
    # The duplicate at index 1 holds the highest reward but is not a valid candidate.
    out = judge_pairs(torch.tensor([[1.0, 9.0, 9.0, 0.0]]), torch.zeros(1, 4), BETA, valid[:1])
    assert (out.chosen_index.item(), out.rejected_index.item()) == (0, 3)


def test_best_worst_vs_best_random_with_four_answers():
    """r = [3, 1, 0, 2]: best_worst pairs (0, 2); best_random pairs 0 with each of 1, 2, 3, never with itself;
    an answer tied with the best (r = [3, 3, 1, 1]) is never its partner."""
    policy, ref = torch.tensor([[3.0, 1.0, 0.0, 2.0]]), torch.zeros(1, 4)
    out = judge_pairs(policy, ref, BETA, pairing="best_worst")
    assert (out.chosen_index.item(), out.rejected_index.item()) == (0, 2)
    torch.testing.assert_close(out.probabilities, torch.sigmoid(torch.tensor([BETA * 3.0], dtype=torch.float64)))
    gen = torch.Generator().manual_seed(0)
    partners = {judge_pairs(policy, ref, BETA, pairing="best_random", generator=gen).rejected_index.item()
                for _ in range(60)}
    assert partners == {1, 2, 3}
    first = judge_pairs(policy, ref, BETA, pairing="best_random", generator=torch.Generator().manual_seed(7))
    again = judge_pairs(policy, ref, BETA, pairing="best_random", generator=torch.Generator().manual_seed(7))
    assert first.rejected_index.item() == again.rejected_index.item()
    tied = torch.tensor([[3.0, 3.0, 1.0, 1.0]])
    for _ in range(20):
        out = judge_pairs(tied, ref, BETA, pairing="best_random", generator=gen)
        assert out.chosen_index.item() == 0 and out.rejected_index.item() in (2, 3)


# ----------------------------------------------------------------------------------------------- log-probs


def test_judged_logps_equal_plain_forward(tiny_model, tiny_tokenizer):
    sequences = _sequences(tiny_tokenizer, 3)
    logps, lengths = completion_logps(tiny_model, sequences, tiny_tokenizer.pad_token_id, max_tokens=64)
    expected = torch.tensor([_plain_logp(tiny_model, p, c) for p, c in sequences])
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=0)
    assert lengths.tolist() == [len(c) for _, c in sequences]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_does_not_change_logps(tiny_model, tiny_tokenizer, padding_side):
    sequences = _sequences(tiny_tokenizer, 8)
    assert len({sum(map(len, s)) for s in sequences}) > 3  # the batch really is padded
    pad_id = tiny_tokenizer.pad_token_id
    batched, _ = completion_logps(tiny_model, sequences, pad_id, 10**6, padding_side=padding_side)
    alone = torch.cat([completion_logps(tiny_model, [s], pad_id)[0] for s in sequences])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)


def test_judged_logps_equal_trl_dpo_reference_logps(tiny_model, tiny_tokenizer, tmp_path):
    """Our formatted pair, prepared and scored by a real AxolotlDPOTrainer, gives the judge's log-probs: pi_init
    (adapters off), a `ref` adapter by name, and pi_cur (scored by TRL through a `ref` copy of the policy)."""
    from datasets import Dataset

    prompt = format_prompt(tiny_tokenizer, MESSAGES[2])
    chosen, rejected = (format_completion(tiny_tokenizer, a) for a in ("yes 1 2", "no"))
    pair = Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    trainer = _dpo_trainer(tiny_model, tiny_tokenizer, tmp_path, pair)
    model, tok = trainer.model, tiny_tokenizer
    prepared = trainer._prepare_dataset(pair, tok, trainer.args, "judged")[0]
    ours = [tokenize_completion(tok, prompt, c) for c in (chosen, rejected)]
    assert [prepared["prompt_ids"], prepared["chosen_ids"]] == list(ours[0])
    assert prepared["rejected_ids"] == ours[1][1]

    def trl_ref_logps():
        chosen_logp, rejected_logp = trainer.compute_ref_log_probs(model, trainer.data_collator([prepared]))
        return torch.cat([chosen_logp, rejected_logp]).cpu()

    _randomize_lora_b(model, "default", seed=1)
    policy, ref, _, _ = score_sequences(model, ours, Scorer(pad_token_id(tok), 32), None)
    torch.testing.assert_close(ref, trl_ref_logps(), atol=1e-4, rtol=0)
    assert not torch.allclose(policy, ref, atol=1e-3)

    # TRL switches to an adapter named `ref` when one exists: as the policy's copy it scores pi_cur.
    from peft import LoraConfig

    model.add_adapter("ref", LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in params.items():
            if ".ref." in name:
                p.copy_(params[name.replace(".ref.", ".default.")])
    torch.testing.assert_close(policy, trl_ref_logps(), atol=1e-4, rtol=0)
    _randomize_lora_b(model, "ref", seed=2)
    _, by_name, _, _ = score_sequences(model, ours, Scorer(pad_token_id(tok), 32), "ref")
    torch.testing.assert_close(by_name, trl_ref_logps(), atol=1e-4, rtol=0)
    assert model.active_adapter == "default"


def test_double_bos_tokenization_follows_trl(tiny_tokenizer, tiny_model, tmp_path):
    """A template that writes BOS plus a tokenizer that adds one: TRL 1.9 keeps both (Axolotl's `_tokenize` fix is
    never called), and so do we, so judged log-probs still match training."""
    from datasets import Dataset
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    prompt = format_prompt(tok, MESSAGES[0])
    pair = Dataset.from_list([{"prompt": prompt, "chosen": "1 2 3 <|end|>", "rejected": "3 <|end|>"}])
    trainer = _dpo_trainer(tiny_model, tok, tmp_path, pair)
    prepared = trainer._prepare_dataset(pair, tok, trainer.args, "judged")[0]
    assert prepared["prompt_ids"][:2] == [tok.bos_token_id] * 2
    assert (prepared["prompt_ids"], prepared["chosen_ids"]) == tokenize_completion(tok, prompt, "1 2 3 <|end|>")


def test_adapters_disabled_equal_base_and_a_step_changes_policy(tiny_model, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    model = _lora(tiny_model, seed=None)
    sequences = _sequences(tiny_tokenizer, 4)
    policy, ref, _, _ = score_sequences(model, sequences, Scorer(pad_token_id(tiny_tokenizer), 128), None)
    bare, _ = completion_logps(base, sequences, tiny_tokenizer.pad_token_id, 128)
    torch.testing.assert_close(ref, bare, atol=1e-5, rtol=0)
    torch.testing.assert_close(policy, bare, atol=1e-5, rtol=0)  # B = 0: the fresh adapter is the identity

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([sequences[0][0] + sequences[0][1]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    stepped, ref_after, _, _ = score_sequences(model, sequences, Scorer(pad_token_id(tiny_tokenizer), 128), None)
    torch.testing.assert_close(ref_after, bare, atol=1e-5, rtol=0)
    assert (stepped - bare).abs().max() > 1e-3
    assert model.training  # restored after judging


def test_module_reference_is_scored_as_given(tiny_model, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    with torch.no_grad():
        reference.lm_head.weight.mul_(2.0)
    sequences = _sequences(tiny_tokenizer, 3)
    policy, ref, _, _ = score_sequences(tiny_model, sequences, Scorer(pad_token_id(tiny_tokenizer), 32), reference)
    torch.testing.assert_close(ref, torch.tensor([_plain_logp(reference, p, c) for p, c in sequences]), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(policy, torch.tensor([_plain_logp(tiny_model, p, c) for p, c in sequences]),
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="needs a PEFT model"):
        score_sequences(tiny_model, sequences, Scorer(pad_token_id(tiny_tokenizer), 32), None)


@pytest.mark.parametrize("reference", [None, "ref"])
def test_judging_under_lora_copies_no_base_weight(tiny_model, tiny_tokenizer, reference):
    """Watch every aten op while judging: none may turn a base weight into a fresh tensor of its shape (a clone, a
    dtype copy, W + BA) or write into one (merging the adapter); parameters keep their storage and flags."""
    from peft import LoraConfig
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    model = _lora(tiny_model, seed=0)
    model.add_adapter("ref", LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    base = {p.untyped_storage().data_ptr(): p for n, p in model.named_parameters() if "lora_" not in n}
    before = [(n, p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()]
    matmuls = {"mm", "addmm", "bmm", "matmul", "linear", "embedding"}

    class CopyWatch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in matmuls:
                return out
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            weights = [base[t.untyped_storage().data_ptr()] for t in inputs if t.untyped_storage().data_ptr() in base]
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                if t.untyped_storage().data_ptr() not in base and any(t.shape == w.shape for w in weights):
                    self.copies.append(str(func))
                elif t.untyped_storage().data_ptr() in base and func._schema.is_mutable:
                    self.copies.append(f"in-place {func}")  # e.g. merging the adapter into W
            return out

    with CopyWatch() as watch:
        score_sequences(model, _sequences(tiny_tokenizer, 4), Scorer(pad_token_id(tiny_tokenizer), 4), reference)
    assert watch.copies == []
    assert [(n, p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()] == before


# ----------------------------------------------------------------------------------------------- judge accuracy


def test_eval_pairs_load_through_axolotl_strategies(tiny_tokenizer, tiny_data_dir, tmp_path):
    with open(f"{tiny_data_dir}/seed.jsonl") as f:
        raw = [json.loads(line) for line in f]
    rows = load_eval_pairs({"path": f"{tiny_data_dir}/seed.jsonl", "type": "chat_template.default"}, tiny_tokenizer)
    assert len(rows) == len(raw)
    assert rows[0]["prompt"] == format_prompt(tiny_tokenizer, raw[0]["messages"])
    assert rows[0]["chosen"] == format_completion(tiny_tokenizer, raw[0]["chosen"]["content"])
    assert rows[0]["rejected"] == format_completion(tiny_tokenizer, raw[0]["rejected"]["content"])

    formatted = tmp_path / "formatted.jsonl"
    formatted.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                 for r in rows))
    assert load_eval_pairs({"path": str(formatted)}, tiny_tokenizer) == [
        {k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows
    ]
    with pytest.raises(ValueError, match="row 0 has no prompt/chosen/rejected"):
        load_eval_pairs({"path": f"{tiny_data_dir}/seed.jsonl"}, tiny_tokenizer)
    with pytest.raises(ValueError, match="not an Axolotl DPO dataset type"):
        load_eval_pairs({"path": f"{tiny_data_dir}/seed.jsonl", "type": "no_such.strategy"}, tiny_tokenizer)


def test_judge_accuracy_matches_the_reward_ordering(tiny_model, tiny_tokenizer, tiny_data_dir):
    rows = load_eval_pairs({"path": f"{tiny_data_dir}/seed.jsonl", "type": "chat_template.default"}, tiny_tokenizer)

    model = _lora(tiny_model, seed=3)
    sequences = [tokenize_completion(tiny_tokenizer, r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    policy, ref, _, _ = score_sequences(model, sequences, Scorer(pad_token_id(tiny_tokenizer), 128), None)
    rewards = (policy - ref).view(-1, 2)
    expected = (rewards[:, 0] > rewards[:, 1]).float().mean().item()
    scorer = Scorer(pad_token_id(tiny_tokenizer), 128)
    assert judge_accuracy(model, tiny_tokenizer, rows, scorer) == pytest.approx(expected)
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    # Seed rows whose numbers are already sorted have chosen == rejected: a tie, wrong both ways round.
    flipped_expected = (rewards[:, 1] > rewards[:, 0]).float().mean().item()
    assert judge_accuracy(model, tiny_tokenizer, flipped, scorer) == pytest.approx(flipped_expected)
