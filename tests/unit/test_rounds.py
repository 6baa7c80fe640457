"""The rounds' resume rules, and a rerun of a finished run, in process. The whole SELFEE loop through the real
`axolotl train` CLI (rounds, artifacts, references, resume after a kill) is in tests/e2e/test_rounds_e2e.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch


def _resume_cfg(tmp_path, **overrides):
    from axolotl.utils.dict import DictDefault

    from selfee_plugin.args import SelfeeConfig

    cfg = DictDefault({"base_model": "m", "adapter": "lora", "rl": "dpo", "rl_beta": 0.1, "learning_rate": 1e-4,
                       "output_dir": str(tmp_path), "datasets": [{"path": "seed.jsonl", "split": "train"}]})
    selfee = {"rounds": [6, 6], "prompts": [{"path": "p.jsonl"}]}
    for key, value in overrides.items():
        if key == "selfee":
            selfee.update(value)
        else:
            cfg[key] = value
    pool = SimpleNamespace(ids=["0:0"], messages=[[{"role": "user", "content": "hi"}]])
    return cfg, SelfeeConfig(**selfee), pool


@pytest.mark.parametrize("change,named", [
    ({"rl_beta": 0.2}, r"rl_beta: 0\.1 -> 0\.2"),
    ({"learning_rate": 5e-4}, r"learning_rate: 0\.0001 -> 0\.0005"),
    ({"dpo_loss_type": ["ipo"]}, r"dpo_loss_type: None -> \['ipo'\]"),
    ({"chat_template": "chatml"}, r"chat_template: None -> 'chatml'"),
    ({"datasets": [{"path": "seed.jsonl", "split": "test"}]}, r"datasets: .*'train'.* -> .*'test'"),
    ({"selfee": {"seed_epochs": 1}}, r"selfee\.seed_epochs: 3\.0 -> 1"),
    ({"selfee": {"rounds": [6, 8]}}, r"selfee\.rounds: \[6, 6\] -> \[6, 8\]"),
])
def test_resume_refuses_a_changed_setting_naming_it_and_both_ways_out(tmp_path, change, named):
    from selfee_plugin.resume import check_resume, save_state

    state = check_resume(*_resume_cfg(tmp_path))
    state["completed"] = [0, 1]
    save_state(tmp_path / "selfee", state)
    with pytest.raises(ValueError, match=named) as error:
        check_resume(*_resume_cfg(tmp_path, **change))
    assert "restore these settings" in str(error.value) and "new output_dir" in str(error.value)


def test_resume_accepts_appended_rounds_and_speed_settings(tmp_path):
    from selfee_plugin.resume import check_resume, save_state

    state = check_resume(*_resume_cfg(tmp_path))
    state["completed"] = [0, 1, 2]
    save_state(tmp_path / "selfee", state)
    faster = {"generation": {"batch_size": 64, "chunk_size": 8, "merge_adapter": True}, "judge": {"batch_tokens": 99}}
    assert check_resume(*_resume_cfg(tmp_path, selfee=faster))["completed"] == [0, 1, 2]
    appended = check_resume(*_resume_cfg(tmp_path, selfee={"rounds": [6, 6, 6]}))
    assert appended["completed"] == [0, 1, 2] and appended["fingerprint"]["selfee.round_sizes"] == [6, 6, 6]


def test_rerunning_a_finished_run_loads_the_last_policy_and_trains_nothing(tiny_model_dir, tmp_path, selfee_logs):
    """`axolotl train` again on an output_dir whose every round is in state.json: the last round's adapter is loaded
    into the policy, the run says so, and nothing is generated, judged or trained (the prompt pool is never read).
    The summary and report, left stale by a kill after the state was written, are rebuilt from the rounds' metrics."""
    from helpers import _lora
    from transformers import AutoModelForCausalLM

    from selfee_plugin.policies import PolicyStore
    from selfee_plugin.rounds import RoundRunner

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    root = tmp_path / "selfee"
    last = _lora(fresh(), seed=1)  # random B: the saved policy differs from a fresh adapter (B = 0)
    last.save_pretrained(str(root / "round_2" / "adapter"))
    for t in range(3):
        (root / f"round_{t}").mkdir(exist_ok=True)
        (root / f"round_{t}" / "metrics.json").write_text(json.dumps({"selfee/round": t, "selfee/pairs": 10.0 + t}))
    (root / "summary.json").write_text(json.dumps([{"selfee/round": 0, "selfee/pairs": 10.0}]))  # round 0 only
    policy = _lora(fresh(), seed=None)
    runner = RoundRunner.__new__(RoundRunner)
    runner.trainer = SimpleNamespace(model=policy, train_dataset=None)
    runner.root, runner.pool, runner.policies = root, None, PolicyStore(runner.trainer, root)
    runner.selfee = SimpleNamespace(round_sizes=[4, 16])
    runner.state = {"completed": [0, 1, 2]}
    runner.train_fn = lambda: pytest.fail("a finished run trained again")
    selfee_logs.handler.setLevel("INFO")
    runner.run()

    assert "every round in" in selfee_logs.text and "already finished; nothing to train" in selfee_logs.text
    assert [row["selfee/round"] for row in json.loads((root / "summary.json").read_text())] == [0, 1, 2]
    report = (root / "report.md").read_text()
    assert [line.split("|")[2].strip() for line in report.splitlines() if line.startswith("| ")][1:] == ["10", "11", "12"]
    assert (root / "report.png").stat().st_size > 0 and not list(root.glob(".*.tmp*"))
    saved = {name: p for name, p in last.named_parameters() if "lora_" in name}
    loaded = {name: p for name, p in policy.named_parameters() if "lora_" in name}
    assert loaded.keys() == saved.keys() and any("lora_B" in name for name in saved)
    for name, value in saved.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
