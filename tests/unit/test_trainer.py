"""SelfeeDPOTrainer built through its real __init__: TRL parity at alpha = 0, hand-checked loss, one training step."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

BETA = 0.1
# Every metric TRL 1.9's DPO `_compute_loss` logs (sigmoid loss, no MoE), then SELFEE's own.
TRL_METRIC_KEYS = {
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
    "logits/chosen", "logits/rejected", "entropy", "num_tokens", "mean_token_accuracy",
}
METRIC_KEYS = TRL_METRIC_KEYS | {
    "selfee/noisy_fraction", "selfee/threshold", "selfee/smoothing_active", "selfee/extrapolated_margin",
}


def _pairs(tiny_data_dir, ref_columns=False):
    """The seed pairs in TRL's conversational preference format, optionally with judged reference log-probs."""
    from datasets import Dataset

    with open(os.path.join(tiny_data_dir, "seed.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    data = {
        "prompt": [row["messages"] for row in rows],
        "chosen": [[row["chosen"]] for row in rows],
        "rejected": [[row["rejected"]] for row in rows],
    }
    if ref_columns:
        rng = np.random.default_rng(0)
        data["ref_chosen_logps"] = (-rng.uniform(5, 25, len(rows))).tolist()
        data["ref_rejected_logps"] = (-rng.uniform(5, 25, len(rows))).tolist()
    return Dataset.from_dict(data)


def _trainer(model, tokenizer, dataset, tmp_path, refine=None, data_collator=None, selfee_as_dict=True, **overrides):
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from axolotl.utils.dict import DictDefault
    from peft import LoraConfig

    from selfee_plugin.args import SelfeeConfig
    from selfee_plugin.context import RunContext
    from selfee_plugin.trainer import SelfeeDPOTrainer

    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2, beta=BETA,
        max_length=64, report_to="none", logging_steps=1, save_strategy="no", remove_unused_columns=False,
        use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    settings.update(overrides)
    # init_lora_weights=False: a zero-initialised B would make every A gradient zero on the first step.
    peft_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    selfee = SelfeeConfig(rounds=0, refine=refine or {})
    # Axolotl hands plugins the validated config as a DictDefault of plain dicts.
    cfg = DictDefault({"selfee": selfee.model_dump()}) if selfee_as_dict else DictDefault({"selfee": selfee})
    return SelfeeDPOTrainer(
        model, None, args=AxolotlDPOConfig(**settings), train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, run_context=RunContext.from_cfg(cfg), data_collator=data_collator,
    )


def _batch(trainer, n=4, start=0):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + n)])


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _count_forwards(trainer):
    """Counts forward passes of the underlying causal LM (policy and adapter-switched reference alike)."""
    calls = []
    # On the decoder stack: PEFT's LoraModel calls the causal LM's `.forward` directly, which skips its hooks.
    trainer.model.get_base_model().model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _params(fn) -> list[str]:
    import inspect

    return [name for name in inspect.signature(fn).parameters if name != "self"]


def test_upstream_contract(tiny_model, tiny_tokenizer, tiny_data_dir, tmp_path):
    """Every upstream internal listed in trainer.py's module docstring exists, with the parameters we pass it."""
    from trl import data_utils as trl_data_utils
    from trl.models import utils as trl_model_utils
    from trl.trainer import utils as trl_utils
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = _trainer(tiny_model, tiny_tokenizer, _pairs(tiny_data_dir), tmp_path)
    assert set(trainer._metrics) == {"train", "eval"}
    trainer._metrics["train"]["probe"].append(1.0)  # a defaultdict(list)
    for name in ["beta", "ref_model", "loss_types", "loss_weights", "ld_alpha", "f_divergence_type",
                 "use_weighting", "use_liger_kernel", "precompute_ref_logps"]:
        assert hasattr(trainer, name), name
    assert isinstance(trainer.callback_handler.callbacks, list) and trainer.callback_handler.callbacks
    assert _params(DPOTrainer.compute_loss) == ["model", "inputs", "return_outputs", "num_items_in_batch"]
    assert _params(DPOTrainer._prepare_dataset) == ["dataset", "processing_class", "args", "dataset_name"]
    assert _params(trainer._save_optimizer_and_scheduler) == ["output_dir"]
    assert _params(trainer._load_optimizer_and_scheduler) == ["checkpoint"]
    assert _params(trl_utils.use_adapter) == ["model", "adapter_name"]
    assert _params(trl_utils.pad)[:3] == ["tensors", "padding_value", "padding_side"]
    assert _params(trl_model_utils.disable_gradient_checkpointing)[:2] == ["model", "gradient_checkpointing_kwargs"]
    assert _params(trl_data_utils._tokenize)[:2] == ["processing_class", "input"]
    # compute_loss(return_outputs=True) hands back the logits the smoothing term reads.
    batch = _batch(trainer)
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape and loss.ndim == 0
    assert not trainer.refine_enabled  # TRL's loss until the round loop turns refinement on


def test_round_learning_rate_and_micro_batch_apply_to_rounds_only(tiny_model, tiny_tokenizer, tiny_data_dir, tmp_path):
    """`selfee.round_learning_rate` / `round_micro_batch_size` reach the optimizer and the dataloader of rounds t >= 1;
    the seed round keeps Axolotl's `learning_rate` / `micro_batch_size`."""
    from types import SimpleNamespace

    from selfee_plugin.args import SelfeeConfig
    from selfee_plugin.rounds import RoundRunner

    trainer = _trainer(tiny_model, tiny_tokenizer, _pairs(tiny_data_dir), tmp_path)
    runner = RoundRunner.__new__(RoundRunner)
    runner.trainer = trainer
    runner.selfee = SelfeeConfig(rounds=0, round_learning_rate=5e-5, round_micro_batch_size=2)
    trainer.run_context.cfg = SimpleNamespace(learning_rate=1e-3, micro_batch_size=4, max_steps=None, warmup_steps=0)
    for refine, lr, pairs in ((True, 5e-5, 2), (False, 1e-3, 4)):
        runner._set_schedule(1.0, refine)
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        assert trainer.optimizer.param_groups[0]["initial_lr" if "initial_lr" in
                                                 trainer.optimizer.param_groups[0] else "lr"] == pytest.approx(lr)
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape[0] == 2 * pairs  # [chosen; rejected]


def test_refine_round_logs_every_trl_metric_with_trl_values(tiny_model, tiny_tokenizer, tiny_data_dir, tmp_path):
    """At alpha = 0 a refine round's step logs what TRL's own compute_loss logs, with the same values
    (`num_tokens` is cumulative: both steps add the same count), plus SELFEE's detection metrics."""
    trainer = _trainer(tiny_model, tiny_tokenizer, _pairs(tiny_data_dir, ref_columns=True), tmp_path,
                       refine={"smoothing": 0.0})
    trainer.precompute_ref_logps = True  # TRL reads the judged columns, as in a round
    batch = _batch(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer.begin_round(refine=True)
    trainer.compute_loss(trainer.model, batch)
    ours = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert TRL_METRIC_KEYS <= trl.keys(), "TRL logs fewer metrics than the contract lists"
    assert METRIC_KEYS <= ours.keys()
    for key in TRL_METRIC_KEYS - {"num_tokens"}:
        assert ours[key] == pytest.approx(trl[key], abs=1e-6), key
    assert ours["num_tokens"] == 2 * trl["num_tokens"]


def test_refine_config_accepted_as_model_or_dict(tiny_model, tiny_tokenizer, tiny_data_dir, tmp_path):
    refine = {"window": 7, "noisy_fraction": 0.3}
    trainer = _trainer(tiny_model, tiny_tokenizer, _pairs(tiny_data_dir), tmp_path, refine=refine, selfee_as_dict=False)
    assert (trainer.noise_detector.window, trainer.noise_detector.noisy_fraction) == (7, 0.3)
    trainer.loss_types = ["ipo"]
    with pytest.raises(ValueError, match="loss_type"):
        trainer.begin_round(refine=True)


@pytest.mark.parametrize(
    "refine,overrides,in_warmup",
    [
        ({"smoothing": 0.0}, {}, False),  # alpha = 0 by config; reference by disabling the adapter
        ({"smoothing": 0.1, "extrapolation": 0.5, "warmup_ratio": 0.5}, {}, True),  # alpha = 0 in warmup, lambda > 0
        # precomputed ref columns on both sides, plus TRL's SFT term on the chosen responses
        (
            {"smoothing": 0.0},
            {"precompute_ref_log_probs": True, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
            False,
        ),
    ],
)
def test_alpha_zero_matches_trl_loss_and_grads(
    tiny_model, tiny_tokenizer, tiny_data_dir, tmp_path, refine, overrides, in_warmup
):
    refine = {"noisy_fraction": 0.3, "window": 8, **refine}
    trainer = _trainer(tiny_model, tiny_tokenizer, _pairs(tiny_data_dir), tmp_path, refine=refine, **overrides)
    batch = _batch(trainer)
    assert ("ref_chosen_logps" in batch) == bool(overrides.get("precompute_ref_log_probs"))

    trl_loss, trl_grads = _loss_and_grads(trainer, batch)
    trainer.begin_round(refine=True)
    if in_warmup:
        trainer.state.max_steps, trainer.state.global_step = 10, 2
    selfee_loss, selfee_grads = _loss_and_grads(trainer, batch)

    metrics = trainer._metrics["train"]
    assert metrics["selfee/smoothing_active"][-1] == 0.0
    assert metrics["selfee/noisy_fraction"][-1] > 0  # pairs were flagged, yet alpha = 0 leaves them untouched
    assert_close(selfee_loss, trl_loss, rtol=0, atol=1e-6)
    assert trl_grads.keys() == selfee_grads.keys() and any("lora" in n for n in trl_grads)
    for name, grad in trl_grads.items():
        assert_close(selfee_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_lambda_zero_loss_equals_hand_computation_across_steps(tiny_model, tiny_tokenizer, tiny_data_dir, tmp_path):
    """With ref columns and lambda = 0: scores = beta * z from an independent forward; the window spans steps
    (W = 6 over two batches of 4), tau = np.quantile(last 6 scores, 0.5), noisy = scores <= tau, and
    loss = mean(-(1 - a n) log s(bz) - a n log s(-bz)) in float64."""
    alpha = 0.2
    refine = {"noisy_fraction": 0.5, "window": 6, "smoothing": alpha, "warmup_ratio": 0.0}
    trainer = _trainer(tiny_model, tiny_tokenizer, _pairs(tiny_data_dir, ref_columns=True), tmp_path, refine=refine)
    trainer.begin_round(refine=True)
    seen = []
    for start in (0, 4):
        batch = _batch(trainer, start=start)
        trainer.model.train()
        with torch.no_grad():
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps = torch.gather(logits[:, :-1].log_softmax(-1), -1, batch["input_ids"][:, 1:, None]).squeeze(-1)
            logps = (logps * batch["completion_mask"][:, 1:]).sum(-1).double()
        chosen, rejected = logps.chunk(2)
        z = (chosen - rejected - (batch["ref_chosen_logps"] - batch["ref_rejected_logps"]).double()).numpy()
        scores = BETA * z
        seen.extend(scores.tolist())
        tau = np.quantile(np.array(seen[-6:]), 0.5)
        noisy = scores <= tau
        a = alpha * noisy
        log_s = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
        expected = np.mean(-(1 - a) * log_s(scores) - a * log_s(-scores))

        loss = trainer.compute_loss(trainer.model, batch)
        assert 0 < noisy.sum() < len(noisy)
        assert math.isclose(loss.item(), expected, rel_tol=0, abs_tol=1e-5)
        assert trainer._metrics["train"]["selfee/noisy_fraction"][-1] == pytest.approx(noisy.mean())
        assert trainer._metrics["train"]["selfee/threshold"][-1] == pytest.approx(tau, abs=1e-6)


def _train_one_round(trainer, **kwargs):
    """One round's training: TRL's `train()`, under SelfeeDPOTrainer.train's round loop."""
    from selfee_plugin.trainer import SelfeeDPOTrainer

    return super(SelfeeDPOTrainer, trainer).train(**kwargs)


# Without judged columns (outside the round loop) TRL runs its reference forward and the detector needs its own.
@pytest.mark.parametrize("ref_columns,extrapolation,forwards", [(True, 0.0, 1), (True, 0.5, 2), (False, 0.5, 3)])
def test_refine_step_trains_lora_only_and_logs_finite_metrics(
    tiny_model, tiny_tokenizer, tiny_data_dir, tmp_path, ref_columns, extrapolation, forwards
):
    """One refine-mode step changes every LoRA param and no base param; with lambda = 0 and ref columns the step
    runs exactly one forward (the policy's): no reference pass. The noise window is saved with the checkpoint and
    restored on resume."""
    refine = {"extrapolation": extrapolation, "warmup_ratio": 0.0, "noisy_fraction": 0.25}
    trainer = _trainer(tiny_model, tiny_tokenizer, _pairs(tiny_data_dir, ref_columns), tmp_path, refine=refine,
                       save_strategy="steps", save_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    calls = _count_forwards(trainer)
    trainer.begin_round(refine=True)
    _train_one_round(trainer)

    assert len(calls) == forwards
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == ("lora_" in name), name
    logs = next(entry for entry in trainer.state.log_history if "rewards/chosen" in entry)
    assert METRIC_KEYS <= logs.keys()
    assert all(math.isfinite(logs[key]) for key in METRIC_KEYS)
    assert logs["selfee/smoothing_active"] == 1.0

    checkpoint = os.path.join(tmp_path, "checkpoint-1")
    with open(os.path.join(checkpoint, "selfee_noise_state.json")) as f:
        saved = json.load(f)
    assert saved["values"] == list(trainer.noise_detector.values) and len(saved["values"]) == 4
    restored = []
    trainer.noise_detector.reset()
    trainer.noise_detector.load_state_dict = lambda state: restored.append(state["values"])
    trainer.begin_round(refine=True)
    _train_one_round(trainer, resume_from_checkpoint=checkpoint)
    assert restored == [saved["values"]]


def test_axolotl_pad_to_multiple_collator_is_replaced_and_keeps_ref_columns(
    tiny_model, tiny_tokenizer, tiny_data_dir, tmp_path
):
    """Axolotl 0.19 uses its own collator when `pad_to_multiple_of` is set. It keeps ref_*_logps but emits no
    input_ids/completion_mask for TRL 1.9's tokenized columns, so the trainer installs TRL's collator with the
    same multiple. If this first assertion fails, Axolotl fixed its collator and the swap can go."""
    from axolotl.utils.collators.dpo import AxolotlDPODataCollatorWithPadding
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    axolotl_collator = AxolotlDPODataCollatorWithPadding(pad_token_id=tiny_tokenizer.pad_token_id, pad_to_multiple_of=8)
    row = {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]}
    row |= {"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}
    upstream = axolotl_collator([row, row])
    assert "input_ids" not in upstream and "ref_chosen_logps" in upstream

    trainer = _trainer(tiny_model, tiny_tokenizer, _pairs(tiny_data_dir, ref_columns=True), tmp_path,
                       data_collator=axolotl_collator, refine={"warmup_ratio": 0.0})
    assert isinstance(trainer.data_collator, DataCollatorForPreference)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["ref_chosen_logps"].shape == batch["ref_rejected_logps"].shape == (4,)
    trainer.begin_round(refine=True)
    calls = _count_forwards(trainer)
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))
    assert len(calls) == 1


def test_default_collator_keeps_ref_columns(tiny_model, tiny_tokenizer, tiny_data_dir, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    dataset = _pairs(tiny_data_dir, ref_columns=True)
    trainer = _trainer(tiny_model, tiny_tokenizer, dataset, tmp_path)
    assert type(trainer.data_collator) is DataCollatorForPreference
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["ref_chosen_logps"].shape == (4,)
    for value in batch["ref_chosen_logps"].tolist():
        assert any(math.isclose(value, judged, rel_tol=1e-6) for judged in dataset["ref_chosen_logps"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_first_refine_step_margin_is_batching_noise_in_half_precision(tiny_model_dir, tiny_tokenizer, tiny_data_dir,
                                                                      tmp_path, dtype):
    """Judged reference columns from the policy itself, then the first refine step: the DPO margin z is zero up to
    the difference between two forwards of the same sequences batched differently (both measured here)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import selective_log_softmax

    from selfee_plugin.logprobs import completion_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    trainer = _trainer(model, tiny_tokenizer, _pairs(tiny_data_dir), tmp_path)
    rows = [trainer.train_dataset[i] for i in range(4)]
    sequences = [(r["prompt_ids"], r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
    pad = tiny_tokenizer.pad_token_id
    together, _ = completion_logps(trainer.model, sequences, pad, max_tokens=10**6)
    alone, _ = completion_logps(trainer.model, sequences, pad, max_tokens=1)
    batching_noise = (together - alone).abs().max().item()
    judged = together.view(4, 2)  # (8,) -> (4, 2): chosen, rejected per pair
    dataset = trainer.train_dataset.select(range(4))
    dataset = dataset.add_column("ref_chosen_logps", judged[:, 0].tolist())
    trainer.train_dataset = dataset.add_column("ref_rejected_logps", judged[:, 1].tolist())
    trainer.begin_round(refine=True)
    assert trainer.precompute_ref_logps

    batch = _batch(trainer)
    trainer.model.train()
    _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert outputs.logits.dtype == torch.float32  # the precision path TRL's loss took
    per_token = selective_log_softmax(outputs.logits[:, :-1].detach(), batch["input_ids"][:, 1:])
    logps = (per_token * batch["completion_mask"][:, 1:]).sum(1)
    chosen, rejected = logps.chunk(2)
    z = (chosen - batch["ref_chosen_logps"]) - (rejected - batch["ref_rejected_logps"])
    print(f"{dtype}: max |z| at the first refine step {z.abs().max().item():.2e}, "
          f"batching noise of the judge {batching_noise:.2e}")
    assert z.abs().max().item() <= 2 * batching_noise + 1e-5
