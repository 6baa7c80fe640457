"""Shared test helpers for the judge and annotation tests: prompts, answers, LoRA wrapping, plain log-probs."""

from __future__ import annotations

import torch

from selfee_plugin.formatting import format_completion, format_prompt, tokenize_completion

BETA = 0.1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MESSAGES = [
    [{"role": "user", "content": "sort 3 1 2"}],
    [{"role": "user", "content": "hello world the numbers"}],
    [{"role": "system", "content": "answer yes or no"}, {"role": "user", "content": "is 1 2"}],
    [{"role": "user", "content": "sort 9"}],
]
ANSWERS = ["1 2 3", "yes", "no no no the a is", "9", "please answer", "a", "hello world 4 5 6 7 8", "the"]


def _lora(model, seed=0, adapter_name="default"):
    """Wrap `model` in LoRA and, with `seed`, give the B matrices random values so the adapter changes outputs."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), adapter_name)
    if seed is not None:
        _randomize_lora_b(model, adapter_name, seed)
    return model


def _randomize_lora_b(model, adapter_name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _sequences(tokenizer, n=8):
    prompts = [format_prompt(tokenizer, MESSAGES[i % len(MESSAGES)]) for i in range(n)]
    return [tokenize_completion(tokenizer, p, format_completion(tokenizer, a)) for p, a in zip(prompts, ANSWERS[:n])]


def _plain_logp(model, prompt_ids, completion_ids):
    """Independent reference: one unpadded forward, log_softmax, gather, sum over completion positions."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    targets = ids[0, len(prompt_ids) :]
    return logprobs[len(prompt_ids) - 1 : -1].gather(1, targets[:, None]).sum().item()


def _dpo_trainer(model, tokenizer, tmp_path, dataset, new_lora=True):
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
    from peft import LoraConfig

    args = AxolotlDPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=BETA, max_length=128,
        per_device_train_batch_size=2, remove_unused_columns=False, save_strategy="no", disable_tqdm=True,
    )
    return AxolotlDPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS) if new_lora else None,
    )
