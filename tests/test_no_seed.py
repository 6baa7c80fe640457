"""No seed pairs: `datasets:` absent, `selfee.judge.reference_model` as pi_init, round 0 skipped (SPEC "No seed data").

The end-to-end test runs the paper's other setting through the real `axolotl train` CLI: an instruct ("SFT") model
judged against the base model it was tuned from.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_axolotl_train, tiny_train_config

ROUNDS = [6]
BASE = {
    "base_model": "unused/model", "rl": "dpo", "adapter": "lora", "learning_rate": 1e-5, "micro_batch_size": 1,
    "gradient_accumulation_steps": 1, "num_epochs": 1, "plugins": ["selfee_plugin.SelfeePlugin"],
    "selfee": {"rounds": [4], "prompts": [{"path": "prompts.jsonl", "ds_type": "json", "type": "prompt"}],
               "judge": {"reference_model": "org/base-model"}},
}


@pytest.fixture
def validate():
    """Axolotl's own config validation with the plugin's schema mixed in, as `axolotl train` runs it."""
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    def run(raw):
        PluginManager._instance = None
        cfg = DictDefault(copy.deepcopy(raw))
        prepare_plugins(cfg)
        return validate_config(cfg)

    yield run
    PluginManager._instance = None


@pytest.mark.parametrize("datasets", ["absent", None, []], ids=["absent", "null", "empty-list"])
def test_no_seed_config_passes_axolotl_validation(validate, datasets):
    raw = copy.deepcopy(BASE)
    if datasets != "absent":
        raw["datasets"] = datasets
    cfg = validate(raw)
    assert cfg.get("datasets") is None
    assert cfg["selfee"]["judge"]["reference_model"] == "org/base-model"


@pytest.mark.parametrize("change,message", [
    (lambda raw: raw["selfee"].pop("judge"), r"no seed preference pairs .* selfee\.judge\.reference_model is required"),
    (lambda raw: raw["selfee"].update(rounds=0), r"selfee\.rounds is 0: there is nothing to train"),
    (lambda raw: raw.update(val_set_size=0.1), r"val_set_size would be ignored.*selfee\.judge\.eval_pairs"),
    (lambda raw: raw["selfee"]["judge"].update(eval_pairs="auto"), r"eval_pairs: auto holds out a share of the seed"),
    (lambda raw: raw.pop("selfee"), "either datasets or pretraining_dataset is required"),  # Axolotl's own check
])
def test_no_seed_config_refused(validate, change, message):
    raw = copy.deepcopy(BASE)
    change(raw)
    with pytest.raises(ValueError, match=message):
        validate(raw)


def test_the_plugin_validator_replaces_axolotls():
    """The plugin's `check_dataset_or_pretraining_dataset` is the one in the merged config class (its mixin precedes
    Axolotl's validation mixins in the MRO); if Axolotl renames or moves its validator, this fails first."""
    from axolotl.integrations.base import PluginManager
    from axolotl.integrations.config import merge_input_args
    from axolotl.utils.schemas.validation import DatasetValidationMixin

    from selfee_plugin.args import SelfeeArgs

    PluginManager._instance = None
    PluginManager.get_instance().register("selfee_plugin.SelfeePlugin")
    try:
        _, merged = merge_input_args()
        validator = merged.__pydantic_decorators__.model_validators["check_dataset_or_pretraining_dataset"]
        assert validator.func.__func__ is SelfeeArgs.check_dataset_or_pretraining_dataset.__func__
        assert hasattr(DatasetValidationMixin, "check_dataset_or_pretraining_dataset")
    finally:
        PluginManager._instance = None


def test_load_datasets_gives_an_empty_seed_set_only_without_seed_pairs():
    from axolotl.utils.dict import DictDefault

    from selfee_plugin.plugin import SelfeePlugin

    plugin = SelfeePlugin()
    meta = plugin.load_datasets(DictDefault({"selfee": BASE["selfee"]}))
    assert len(meta.train_dataset) == 0 and meta.eval_dataset is None
    assert set(meta.train_dataset.column_names) == {"prompt", "chosen", "rejected"}
    assert plugin.load_datasets(DictDefault({"selfee": BASE["selfee"]}), preprocess=True) is not None
    assert plugin.load_datasets(DictDefault({"selfee": BASE["selfee"], "datasets": [{"path": "x"}]})) is None
    assert plugin.load_datasets(DictDefault({})) is None  # not a SELFEE run: Axolotl loads its datasets


def test_reference_model_must_share_the_policy_tokenizer(tiny_model_dir, tiny_tokenizer, tmp_path):
    from axolotl.utils.dict import DictDefault
    from selfee_demo.tiny import build_tiny_llama, build_tokenizer

    from selfee_plugin.data_checks import check_reference_model

    cfg = DictDefault({})
    check_reference_model(cfg, tiny_model_dir, tiny_tokenizer)  # the same tokenizer: fine

    # Config and tokenizer files only: the check reads no weights.
    build_tiny_llama(tiny_tokenizer, None).config.save_pretrained(str(tmp_path / "other"))
    build_tokenizer(["zebra yak xylophone sort 3 2 1 please"], save_dir=str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"selfee\.judge\.reference_model .*other.* has another tokenizer"):
        check_reference_model(cfg, str(tmp_path / "other"), tiny_tokenizer)

    small = build_tiny_llama(tiny_tokenizer, None).config
    small.vocab_size = len(tiny_tokenizer) - 2
    small.save_pretrained(str(tmp_path / "small"))
    with pytest.raises(ValueError, match=r"token embeddings, fewer than the \d+ tokens of the policy's tokenizer"):
        check_reference_model(cfg, str(tmp_path / "small"), tiny_tokenizer)

    with pytest.raises(ValueError, match=r"selfee\.judge\.reference_model .*empty.* cannot be read as a model"):
        (tmp_path / "empty").mkdir()
        check_reference_model(cfg, str(tmp_path / "empty"), tiny_tokenizer)


def test_reference_model_is_loaded_quantized_like_the_policy(tiny_model_dir):
    """Under QLoRA the reference is loaded in 4-bit too (a 7B reference: ~4 GB instead of 14 GB in bf16)."""
    from bitsandbytes.nn import Linear4bit
    from helpers import _lora
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from selfee_plugin.references import init_judge_reference

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                      bnb_4bit_quant_type="nf4")
    policy = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                        quantization_config=quantization), seed=None)
    reference = init_judge_reference(policy, None, tiny_model_dir)
    assert any(isinstance(module, Linear4bit) for module in reference.modules())
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    plain = init_judge_reference(_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       seed=None), None, tiny_model_dir)
    assert not any(isinstance(module, Linear4bit) for module in plain.modules()) and plain.dtype == torch.float32


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
        "rounds": ROUNDS,
        "prompts": [{"path": f"{data_dir}/prompts.jsonl", "ds_type": "json", "type": "prompt"}],
        "generation": {"max_new_tokens": 8, "batch_size": 3, "chunk_size": 3, "temperature": 1.0},
        "judge": {"reference_model": reference_dir, "batch_tokens": 256},
        "guard": {"enabled": False},  # this test is about no-seed mode; the guard would undo a tiny noisy round
    }
    cfg = tiny_train_config(policy_dir, data_dir, str(out), selfee=selfee, learning_rate=2e-2, **overrides)
    del cfg["datasets"]
    return cfg


def _logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log pi(completion | prompt), one unpadded float32 forward: independent of the judge's batching."""
    from selfee_plugin.formatting import tokenize_completion

    prompt_ids, completion_ids = tokenize_completion(tokenizer, prompt, completion)
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    target = ids[0, len(prompt_ids):]
    return logprobs[len(prompt_ids) - 1 : -1].gather(1, target[:, None]).sum().item()


@pytest.fixture(scope="module")
def sft_adapter_dir(tiny_model_dir, tmp_path_factory):
    """An "SFT" LoRA adapter on the tiny base (random B: it changes the model), as an Axolotl SFT run would leave in
    its output_dir for `lora_model_dir`."""
    from helpers import _lora
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny_sft_lora")
    _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), seed=1).save_pretrained(str(path))
    return str(path)


@pytest.mark.e2e
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
    policy_logp = _logp(policy.eval(), tokenizer, row["prompt"], completion)
    reference_logp = _logp(reference.eval(), tokenizer, row["prompt"], completion)
    assert row["policy_logps"][0] == pytest.approx(policy_logp, abs=1e-4)
    assert row["ref_logps"][0] == pytest.approx(reference_logp, abs=1e-4)
    assert abs(policy_logp - reference_logp) > 1e-2  # the reference is the base model, not the policy itself

    if start == "sft_model":
        # A rerun of the finished run loads round 1's policy and trains nothing.
        rerun = run_axolotl_train(cfg, tmp_path)
        assert "already finished; nothing to train" in rerun.output
        assert "selfee round 1 done" not in rerun.output and "'rewards/margins':" not in rerun.output
        assert [row["selfee/round"] for row in json.loads((root / "summary.json").read_text())] == [1]


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_a_firing_guard_without_seed_or_adapter_restores_the_starting_model(sft_model_dir, tiny_model_dir,
                                                                             tiny_data_dir, tmp_path):
    """No seed round and full fine-tuning: no earlier round's model on disk to restore, so the guard restores the
    in-memory copy of the whole starting model. The model Axolotl saves equals the SFT model it started from."""
    from conftest import run_axolotl_train
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
