"""No seed pairs through the real `axolotl train` CLI: the paper's other setting, an instruct ("SFT") model (or the
base with an SFT adapter) judged against the base model it was tuned from; `axolotl preprocess`; a firing guard
with nothing on disk to restore."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import _completion_logp, _lora, run_axolotl_train, tiny_rounds_config

ROUNDS = [6]


@pytest.fixture(scope="module")
def sft_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny base model after a few plain SFT steps on sorted answers: the policy, judged against the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfee_plugin.formatting import format_completion, format_prompt, tokenize_completion

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(16):
        nums = [str(n) for n in torch.randint(0, 10, (4,), generator=gen).tolist()]
        prompt = format_prompt(tokenizer, [{"role": "user", "content": "sort " + " ".join(nums)}])
        answer = format_completion(tokenizer, " ".join(sorted(nums)))
        prompt_ids, answer_ids = tokenize_completion(tokenizer, prompt, answer)
        examples.append((prompt_ids, answer_ids))
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # a few epochs: enough to move it visibly away from the base
        for prompt_ids, answer_ids in examples:
            ids = torch.tensor([prompt_ids + answer_ids])
            labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    path = tmp_path_factory.mktemp("tiny_sft")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def _no_seed_cfg(policy_dir, reference_dir, data_dir, out, **overrides):
    selfee = {
        "judge": {"reference_model": reference_dir, "batch_tokens": 256},
        "guard": {"enabled": False},  # this test is about no-seed mode; the guard would undo a tiny noisy round
    }
    cfg = tiny_rounds_config(policy_dir, data_dir, out, rounds=ROUNDS, batch_size=3, selfee=selfee,
                             learning_rate=2e-2, **overrides)
    del cfg["datasets"]
    return cfg


@pytest.fixture(scope="module")
def sft_adapter_dir(tiny_model_dir, tmp_path_factory):
    """An "SFT" LoRA adapter on the tiny base (random B: it changes the model), as an Axolotl SFT run would leave in
    its output_dir for `lora_model_dir`."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny_sft_lora")
    _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), seed=1).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("start", ["sft_model", "lora_model_dir"])
def test_no_seed_rounds_through_the_cli(start, request, tiny_model_dir, tiny_data_dir, tmp_path):
    """Policy = an SFT model (or the base + an SFT adapter in `lora_model_dir`), judge reference = the base model."""
    from peft import PeftModel
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    if start == "sft_model":
        policy_dir = request.getfixturevalue("sft_model_dir")
        cfg = _no_seed_cfg(policy_dir, tiny_model_dir, tiny_data_dir, out)
    else:
        adapter_dir = request.getfixturevalue("sft_adapter_dir")
        cfg = _no_seed_cfg(tiny_model_dir, tiny_model_dir, tiny_data_dir, out, lora_model_dir=adapter_dir)
    assert "datasets" not in cfg
    proc = run_axolotl_train(cfg, tmp_path)
    assert "selfee: no seed pairs" in proc.output and "selfee round 0 skipped: no seed pairs" in proc.output
    assert "selfee round 1 done" in proc.output and "'rewards/margins':" in proc.output

    root = out / "selfee"
    assert not (root / "round_0").exists()
    summary = json.loads((root / "summary.json").read_text())
    assert [row["selfee/round"] for row in summary] == [1]
    metrics = json.loads((root / "round_1" / "metrics.json").read_text())
    assert metrics["selfee/pairs"] > 0 and metrics["selfee/seconds_train"] > 0
    assert json.loads((root / "state.json").read_text())["completed"] == [1]
    assert (root / "report.md").exists() and (out / "adapter_model.safetensors").exists()

    # Round 1 trained the policy from its start (a fresh adapter, B = 0; or the SFT adapter), and the final adapter
    # in output_dir is round 1's.
    trained = load_peft_weights(str(root / "round_1" / "adapter"))
    start_weights = load_peft_weights(adapter_dir) if start == "lora_model_dir" else {}
    moved = max((value - start_weights.get(name, torch.zeros_like(value))).abs().max().item()
                for name, value in trained.items())
    assert moved > 1e-3
    final = load_peft_weights(str(out))
    for name, value in trained.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0)

    # Judged with log pi_0 from the policy as it started (round 1 samples from pi_0) and log pi_init from
    # judge.reference_model: recompute one of each independently.
    rows = [json.loads(line) for line in (root / "round_1" / "pairs.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["skip_reason"] is None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if start == "sft_model":
        policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    else:
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                           adapter_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    completion = row["completions"][0]
    policy_logp = _completion_logp(policy.eval(), tokenizer, row["prompt"], completion)
    reference_logp = _completion_logp(reference.eval(), tokenizer, row["prompt"], completion)
    assert row["policy_logps"][0] == pytest.approx(policy_logp, abs=1e-4)
    assert row["ref_logps"][0] == pytest.approx(reference_logp, abs=1e-4)
    assert abs(policy_logp - reference_logp) > 1e-2  # the reference is the base model, not the policy itself

    if start == "sft_model":
        # A rerun of the finished run loads round 1's policy and trains nothing.
        rerun = run_axolotl_train(cfg, tmp_path)
        assert "already finished; nothing to train" in rerun.output
        assert "selfee round 1 done" not in rerun.output and "'rewards/margins':" not in rerun.output
        assert [row["selfee/round"] for row in json.loads((root / "summary.json").read_text())] == [1]


def test_preprocess_has_nothing_to_prepare(sft_model_dir, tiny_model_dir, tiny_data_dir, tmp_path):
    """`axolotl preprocess` on a no-seed config: the plugin's `load_datasets` answers, Axolotl's loader never runs."""
    import os
    import subprocess
    import sys

    import yaml

    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(_no_seed_cfg(sft_model_dir, tiny_model_dir, tiny_data_dir, tmp_path / "out")))
    axolotl = os.path.join(os.path.dirname(sys.executable), "axolotl")
    proc = subprocess.run([axolotl, "preprocess", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "selfee: no seed pairs (`datasets:` is absent): nothing to preprocess" in output


def test_a_firing_guard_without_seed_or_adapter_restores_the_starting_model(sft_model_dir, tiny_model_dir,
                                                                             tiny_data_dir, tmp_path):
    """No seed round and full fine-tuning: no earlier round's model on disk to restore, so the guard restores the
    in-memory copy of the whole starting model. The model Axolotl saves equals the SFT model it started from."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    cfg = _no_seed_cfg(sft_model_dir, tiny_model_dir, tiny_data_dir, out)
    cfg["learning_rate"] = 1e-4
    cfg["selfee"]["guard"] = {"probe_prompts": 3, "min_chosen_drift": 100.0}  # a rule no round passes
    for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_linear"):
        cfg.pop(key)
    cfg["adapter"] = None
    proc = run_axolotl_train(cfg, tmp_path)
    assert "the round guard stopped the loop at round 1" in proc.output
    root = out / "selfee"
    assert not (root / "round_0").exists() and not (root / "round_1" / "model").exists()
    start = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32).state_dict()
    final = load_file(str(out / "model.safetensors"))
    rejected = load_file(str(root / "round_1" / "rejected" / "attempt_1" / "model" / "model.safetensors"))
    assert final.keys() <= start.keys() and len(final) > 10
    for name in final:
        assert torch.equal(final[name], start[name]), name
    assert any(not torch.equal(rejected[name], start[name]) for name in final)
