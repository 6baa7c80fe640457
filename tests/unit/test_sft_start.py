"""Starting from an SFT adapter (`lora_model_dir`): pi_init is the SFT adapter's model, not the bare base."""

from __future__ import annotations

import torch
from helpers import LORA_TARGETS, _randomize_lora_b


def test_judge_reference_is_the_sft_adapter_not_the_base(tiny_model_dir, tiny_tokenizer, tmp_path):
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from axolotl.utils.dict import DictDefault
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfee_plugin.formatting import format_completion, format_prompt, pad_token_id, tokenize_completion
    from selfee_plugin.judge import score_sequences
    from selfee_plugin.logprobs import Scorer
    from selfee_plugin.plugin import SelfeePlugin
    from selfee_plugin.references import snapshot_dpo_reference
    from selfee_plugin.rounds import RoundRunner

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    sft = get_peft_model(base(), lora)
    _randomize_lora_b(sft, "default", seed=1)  # an "SFT" adapter that changes the model
    sft.save_pretrained(str(tmp_path / "sft"))

    cfg = DictDefault({
        "base_model": tiny_model_dir, "adapter": "lora", "lora_model_dir": str(tmp_path / "sft"), "rl": "dpo",
        "datasets": [], "selfee": {"rounds": 0}, "output_dir": str(tmp_path / "out"),
    })
    plugin = SelfeePlugin()
    plugin.pre_model_load(cfg)
    plugin.post_model_load(cfg, base())
    args = AxolotlDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False,
                            max_length=64, save_strategy="no")
    prompt = format_prompt(tiny_tokenizer, [{"role": "user", "content": "sort 3 1 2"}])
    pair = Dataset.from_list([{"prompt": prompt, "chosen": format_completion(tiny_tokenizer, "1 2 3"),
                               "rejected": format_completion(tiny_tokenizer, "3 1 2")}])
    trainer = plugin.get_trainer_cls(cfg)(args=args, train_dataset=pair, processing_class=tiny_tokenizer,
                                          peft_config=lora)
    runner = RoundRunner(trainer, train_fn=lambda: None)
    assert runner.judge_reference == "selfee_init"

    scorer = Scorer(pad_token_id(tiny_tokenizer))
    seq = [tokenize_completion(tiny_tokenizer, prompt, format_completion(tiny_tokenizer, "1 2 3"))]
    with torch.no_grad():
        _, init_logps, _, _ = score_sequences(trainer.model, seq, scorer, reference=runner.judge_reference)
        sft_logps, bare_logps, _, _ = score_sequences(sft, seq, scorer, reference=None)
    torch.testing.assert_close(init_logps, sft_logps, atol=1e-4, rtol=0)
    assert (init_logps - bare_logps).abs().max() > 1e-2

    # Training moves the policy and later snapshots overwrite `ref`; pi_init stays the SFT adapter.
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B.default." in name:
                param.add_(0.5)
    snapshot_dpo_reference(trainer.model, trainer)
    with torch.no_grad():
        _, init_after, _, _ = score_sequences(trainer.model, seq, scorer, reference=runner.judge_reference)
    torch.testing.assert_close(init_after, sft_logps, atol=1e-4, rtol=0)
