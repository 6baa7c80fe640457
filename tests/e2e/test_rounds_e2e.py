"""The whole SELFEE loop through the real `axolotl train` CLI: rounds, artifacts, references, resume. In-process
tests of the resume rules: tests/unit/test_rounds.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import _completion_logp, _rows, run_axolotl_train, tiny_rounds_config

from selfee_plugin.patches import bitsandbytes_cpu_weight_packing

ROUNDS = [6, 6]


def _selfee_cfg(model_dir, data_dir, out, rounds=ROUNDS, batch_size=2, **overrides):
    return tiny_rounds_config(model_dir, data_dir, out, rounds=rounds, batch_size=batch_size, **overrides)


def _check_artifacts(out, rounds=ROUNDS):
    root = out / "selfee"
    summary = json.loads((root / "summary.json").read_text())
    assert [row["selfee/round"] for row in summary] == [0, 1, 2]
    report = (root / "report.md").read_text()
    assert sum(line.startswith("| ") for line in report.splitlines()) == 1 + len(summary)
    prompt_ids = []
    for t in (1, 2):
        rows = _rows(root / f"round_{t}" / "pairs.jsonl")
        metrics = json.loads((root / f"round_{t}" / "metrics.json").read_text())
        assert len(rows) == rounds[t - 1] == metrics["selfee/prompts_judged"]
        assert metrics["selfee/pairs"] == sum(r["skip_reason"] is None for r in rows)
        for key in ("selfee/seconds_generate", "selfee/seconds_judge", "selfee/seconds_train", "selfee/distinct_2",
                    "selfee/logps_drift_chosen", "selfee/kl_previous", "selfee/judge_agreement_after"):
            assert key in metrics
        prompt_ids += [r["prompt_id"] for r in rows]
        assert (root / f"round_{t}" / "adapter" / "adapter_model.safetensors").exists()
    assert len(prompt_ids) == len(set(prompt_ids)) == sum(rounds)  # no prompt used twice
    assert (out / "adapter_model.safetensors").exists()
    return summary


def _policy_logps(model_dir, adapter_dir, rows, load_in_4bit=False):
    """log pi(y|x) of each judged response under base + `adapter_dir`, computed independently of the judge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                                           bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, **kwargs), adapter_dir).eval()
    bitsandbytes_cpu_weight_packing.apply(model)  # the plugin's own setting: no bf16 repacking on AVX512-BF16 CPUs
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [_completion_logp(model, tokenizer, row["prompt"], completion)
            for row in rows for completion in row["completions"]]


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_seed_round_and_two_rounds_through_the_cli(adapter, tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    extra = {"adapter": adapter, "learning_rate": 2e-2}  # big steps: each round must move the tiny policy visibly
    if adapter == "qlora":
        extra.update(load_in_4bit=True)
    cfg = _selfee_cfg(tiny_model_dir, tiny_data_dir, out, **extra)
    proc = run_axolotl_train(cfg, tmp_path)
    assert "Plugin loaded successfully: selfee_plugin.SelfeePlugin" in proc.output
    assert "'loss':" in proc.output and "'rewards/margins':" in proc.output
    for t in range(3):
        assert f"selfee round {t} done" in proc.output
    assert "'selfee/noisy_fraction'" in proc.output and "'selfee/threshold'" in proc.output
    _check_artifacts(out)
    if adapter == "lora":
        # Same config and seed, another output_dir: byte-identical judged pairs in every round (CPU).
        again = tmp_path / "again"
        again.mkdir()
        run_axolotl_train(_selfee_cfg(tiny_model_dir, tiny_data_dir, again / "out", **extra), again)
        for t in (1, 2):
            pairs = f"selfee/round_{t}/pairs.jsonl"
            assert (again / "out" / pairs).read_bytes() == (out / pairs).read_bytes(), f"round {t} differs"
        _rerun_refuses_a_changed_beta_then_appends_a_round(cfg, out, tmp_path)

    # Round 2 was generated and judged by round 1's policy: its recorded log pi_cur equal base + round_1 adapter's.
    rows = [r for r in _rows(out / "selfee" / "round_2" / "pairs.jsonl") if r["completions"]][:3]
    judged = [lp for r in rows for lp in r["policy_logps"]]
    recomputed = _policy_logps(tiny_model_dir, str(out / "selfee" / "round_1" / "adapter"), rows,
                               load_in_4bit=adapter == "qlora")
    tol = 1e-4 if adapter == "lora" else 1e-3
    # bitsandbytes' CPU 4-bit matmul gives shape-dependent rounding: a response judged inside a padded batch and
    # recomputed alone differ by up to ~1e-4 relative (measured 1.2e-3 and 1.3e-3 on log-probs near -13).
    rtol = 0 if adapter == "lora" else 2e-4
    torch.testing.assert_close(torch.tensor(judged), torch.tensor(recomputed), atol=tol, rtol=rtol)
    round_0 = _policy_logps(tiny_model_dir, str(out / "selfee" / "round_0" / "adapter"), rows,
                            load_in_4bit=adapter == "qlora")
    assert max(abs(a - b) for a, b in zip(judged, round_0)) > 10 * tol  # and not by round 0's


def _rerun_refuses_a_changed_beta_then_appends_a_round(cfg, out, tmp_path):
    """On the finished run: another rl_beta is refused before any weights load, naming the key and both ways out;
    appending a third round trains only that round."""
    refused = run_axolotl_train({**cfg, "rl_beta": 0.2}, tmp_path, check=False)
    assert refused.returncode != 0
    assert "rl_beta: None -> 0.2" in refused.output and "new output_dir" in refused.output  # unset: TRL's 0.1
    assert "axolotl.loaders.model" not in refused.output  # refused before the model loader ran
    appended = run_axolotl_train({**cfg, "selfee": {**cfg["selfee"], "rounds": ROUNDS + [6]}}, tmp_path)
    assert "selfee round 0 (seed) already finished" in appended.output
    assert "selfee round 1 already finished" in appended.output and "selfee round 2 already finished" in appended.output
    assert "selfee round 3 done" in appended.output
    summary = json.loads((out / "selfee" / "summary.json").read_text())
    assert [row["selfee/round"] for row in summary] == [0, 1, 2, 3]


def test_sigkill_during_round_2_then_rerun_finishes_everything(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    rounds = [4, 16]  # one prompt per judged chunk in round 2: a wide window to kill it mid-round
    cfg = _selfee_cfg(tiny_model_dir, tiny_data_dir, out, rounds=rounds, batch_size=1)
    # Prompts over max_prompt_length: with one prompt per chunk, each is a chunk of only too-long prompts.
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text("".join(json.dumps({"prompt": "sort " + "9 " * 60}) + "\n" for _ in range(10)))
    cfg["selfee"]["prompts"].append({"path": str(long_prompts), "ds_type": "json", "type": "prompt"})
    cfg["selfee"]["generation"]["max_prompt_length"] = 40
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    axolotl = os.path.join(os.path.dirname(sys.executable), "axolotl")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([axolotl, "train", str(path)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pairs = out / "selfee" / "round_2" / "pairs.jsonl"
    deadline = time.monotonic() + 600
    # Kill as soon as round 2 has judged some prompts but not all.
    while time.monotonic() < deadline and proc.poll() is None:
        if pairs.exists() and 0 < len(pairs.read_text().splitlines()) < rounds[1] // 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, open(tmp_path / "first.log").read()[-3000:]
    written = len(pairs.read_text().splitlines())
    assert 0 < written < rounds[1]

    rerun = run_axolotl_train(cfg, tmp_path)
    assert "selfee round 1 already finished" in rerun.output
    assert f"{written} prompt(s) already judged" in rerun.output
    _check_artifacts(out, rounds)
    long_rows = too_long = 0
    for t in (1, 2):
        rows = _rows(out / "selfee" / f"round_{t}" / "pairs.jsonl")
        long_rows += sum(r["prompt_id"].startswith("1:") for r in rows)
        assert all(r["skip_reason"] == "prompt_too_long" for r in rows if r["prompt_id"].startswith("1:"))
        too_long += json.loads((out / "selfee" / f"round_{t}" / "metrics.json").read_text())[
            "selfee/skipped_prompt_too_long"]
    assert long_rows > 0 and too_long == long_rows
    metrics = json.loads((out / "selfee" / "round_2" / "metrics.json").read_text())
    assert metrics["selfee/prompts_resumed"] == written
    # A third run of the finished output_dir: tests/unit/test_rounds.py,
    # test_rerunning_a_finished_run_loads_the_last_policy_and_trains_nothing.
