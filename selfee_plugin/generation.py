"""Sampling of new responses from the current policy, and the text format that DPO training reads back."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from trl.data_utils import _tokenize
from trl.trainer.utils import pad

from ._logging import get_logger

LOG = get_logger(__name__)

# Axolotl's `chat_template.default` DPO strategy renders each answer after this user turn and cuts at its content.
DUMMY_USER_MESSAGE = {"role": "user", "content": "[[dummy_message]]"}


def format_prompt(tokenizer, messages: list[dict], chat_template: str | None = None) -> str:
    """Render the prompt turns with the generation prompt, as Axolotl's `chat_template.default` DPO strategy does."""
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, chat_template=chat_template, tokenize=False
    )


def format_completion(tokenizer, content: str, chat_template: str | None = None) -> str:
    """Render one assistant answer as Axolotl's `chat_template.default` does: from its content to the end of turn.

    Axolotl cuts at `rendered.find(content)`, which for a short answer such as "a" can match inside the dummy turn
    or the assistant header; the search starts after the generation prompt instead (after the dummy turn when the
    template renders the two differently), which gives the same string whenever Axolotl's is right.
    """
    rendered = tokenizer.apply_chat_template(
        [DUMMY_USER_MESSAGE, {"role": "assistant", "content": content}],
        add_generation_prompt=False,
        chat_template=chat_template,
        tokenize=False,
    )
    header = format_prompt(tokenizer, [DUMMY_USER_MESSAGE], chat_template)
    if rendered.startswith(header):
        offset = len(header)
    else:
        offset = rendered.find(DUMMY_USER_MESSAGE["content"]) + len(DUMMY_USER_MESSAGE["content"])
    start = rendered.find(content, offset)
    if start < 0:
        start = rendered.find(content)
    return rendered[start:].rstrip()


def format_preference_rows(
    rows: list[dict],
    tokenizer,
    strategy: str = "chat_template.default",
    ds_cfg: dict | None = None,
    chat_template: str | None = None,
) -> list[dict]:
    """Format raw preference rows into prompt/chosen/rejected strings with one of Axolotl's own DPO strategies.

    Args:
        rows: raw dataset rows, e.g. messages/chosen/rejected for `chat_template.default`.
        strategy: an Axolotl DPO `type:` (`chat_template.default`, `chatml.intel`, ...).
        ds_cfg: the dataset entry's options (`field_messages`, `roles`, ...), as in Axolotl's `datasets:`.
        chat_template: Jinja template overriding the tokenizer's.

    Raises:
        ValueError: Axolotl has no DPO strategy of that name.
    """
    import inspect

    from axolotl.prompt_strategies.dpo import load as load_dpo_strategy
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({"datasets": [DictDefault(dict(ds_cfg or {}))]})
    if chat_template is not None:
        cfg.update(chat_template="jinja", chat_template_jinja=chat_template)
    transform = load_dpo_strategy(strategy, cfg, dataset_idx=0)
    if transform is None:
        raise ValueError(f"{strategy!r} is not an Axolotl DPO dataset type (see the warning above for why).")
    transform = transform[0] if isinstance(transform, tuple) else transform
    kwargs = {"tokenizer": tokenizer} if "tokenizer" in inspect.signature(transform).parameters else {}
    return [transform(dict(row), **kwargs) for row in rows]


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a formatted prompt, exactly as TRL 1.9's `DPOTrainer._prepare_dataset` builds `prompt_ids`."""
    return list(_tokenize(tokenizer, prompt)["input_ids"])


def tokenize_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of a formatted (prompt, completion) pair, exactly as TRL 1.9's DPO training sees them.

    TRL appends EOS to a completion that lacks it, tokenizes `prompt` and `prompt + completion` (non-conversational
    path) and keeps the tail after the prompt's length. Axolotl's double-BOS fix (`AxolotlDPOTrainer._tokenize`)
    is not reproduced: TRL 1.9 calls the module-level `trl.data_utils._tokenize`, so that override never runs.

    Returns:
        prompt_ids, completion_ids: the ids `DataCollatorForPreference` concatenates.
    """
    if not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    full_ids = list(_tokenize(tokenizer, prompt + completion)["input_ids"])
    if full_ids[: len(prompt_ids)] != prompt_ids:
        LOG.debug("prompt tokens differ at the prompt/completion boundary; following TRL's split by length")
    return prompt_ids, full_ids[len(prompt_ids) :]


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids that end an answer: the tokenizer's EOS plus any the model's generation config lists (end of turn)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


@dataclass
class Generations:
    """Responses sampled for a list of prompts, aligned with the prompts' order.

    Attributes:
        prompts: formatted prompt strings, one per input prompt.
        responses: per prompt, n decoded answers (special tokens skipped, stripped); None when the prompt was skipped.
        finished: per prompt, whether each answer stopped at EOS (False: cut at max_new_tokens); None when skipped.
        skipped: prompt index -> reason (`prompt_too_long`).
        generated_tokens: sampled tokens, EOS included, padding after EOS excluded.
        seconds: wall time of sampling.
    """

    prompts: list[str]
    responses: list[list[str] | None]
    finished: list[list[bool] | None]
    skipped: dict[int, str] = field(default_factory=dict)
    generated_tokens: int = 0
    seconds: float = 0.0


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def eval_mode(*modules):
    """Put `modules` in eval mode and restore every submodule's own train/eval flag afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _sampling_kwargs(gen_cfg, n: int, stop_ids: list[int], pad_token_id: int) -> dict:
    # Every knob a checkpoint's generation_config.json could set is given explicitly: otherwise transformers falls
    # back to top_k=50 or to the hub's repetition_penalty, which is not the paper's sampling (temperature, top_p only).
    return {
        "do_sample": True,
        "temperature": gen_cfg.temperature,
        "top_p": gen_cfg.top_p,
        "top_k": 0,
        "min_p": None,
        "typical_p": 1.0,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "max_new_tokens": gen_cfg.max_new_tokens,
        "min_new_tokens": 0,
        "num_return_sequences": n,
        "eos_token_id": stop_ids,
        "pad_token_id": pad_token_id,
        "use_cache": True,
    }


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[list[dict]],
    gen_cfg,
    n: int,
    seed: int,
    chat_template: str | None = None,
    progress: bool = True,
) -> Generations:
    """Sample `n` answers per prompt from `model` (plain or PEFT), in batches of `gen_cfg.batch_size` prompts.

    Prompts are rendered with the chat template's generation prompt and tokenized as DPO training will; those longer
    than `gen_cfg.max_prompt_length` tokens are skipped (never truncated). Batches are left padded by hand (the
    tokenizer's padding side is never touched), sorted by length to waste little padding, and sampled with the KV
    cache. Sampling runs under a forked RNG seeded with `seed`, so the caller's RNG state is unchanged and the same
    seed and prompts give the same answers. The model's train/eval mode is restored afterwards.

    Args:
        model: the current policy.
        tokenizer: its tokenizer; `pad_token_id` must be set.
        prompts: chat turns per prompt, ending before the answer.
        gen_cfg: `selfee.generation` (`GenerationConfig`).
        n: answers per prompt.
        seed: sampling seed.
        chat_template: Jinja template overriding the tokenizer's, as Axolotl's `chat_template` choice resolves it.
        progress: show a tqdm bar over batches.

    Returns:
        Generations aligned with `prompts`.
    """
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = stop_token_ids(model, tokenizer)
    texts = [format_prompt(tokenizer, m, chat_template) for m in prompts]
    out = Generations(prompts=texts, responses=[None] * len(texts), finished=[None] * len(texts))
    kept = []
    for i, text in enumerate(texts):
        ids = tokenize_prompt(tokenizer, text)
        if len(ids) > gen_cfg.max_prompt_length:
            out.skipped[i] = "prompt_too_long"
        else:
            kept.append((i, ids))
    if out.skipped:
        LOG.info(f"skipped {len(out.skipped)} prompt(s) longer than {gen_cfg.max_prompt_length} tokens")
    kept.sort(key=lambda item: len(item[1]), reverse=True)
    batches = [kept[k : k + gen_cfg.batch_size] for k in range(0, len(kept), gen_cfg.batch_size)]
    kwargs = _sampling_kwargs(gen_cfg, n, stop_ids, pad_id)

    start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with eval_mode(model):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in tqdm(batches, desc="selfee generate", disable=not progress):
                input_ids = pad([torch.tensor(ids) for _, ids in batch], pad_id, "left").to(device)
                attention_mask = pad([torch.ones(len(ids), dtype=torch.long) for _, ids in batch], 0, "left")
                sequences = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask.to(device), **kwargs
                )
                new_tokens = sequences[:, input_ids.shape[1] :].cpu()  # (B * n, T), sequences of a prompt adjacent
                for row, (index, _) in enumerate(batch):
                    answers, finished = [], []
                    for ids in new_tokens[row * n : (row + 1) * n].tolist():
                        stop = next((k for k, tok in enumerate(ids) if tok in stop_ids), None)
                        finished.append(stop is not None)
                        ids = ids if stop is None else ids[: stop + 1]
                        out.generated_tokens += len(ids)
                        answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
                    out.responses[index], out.finished[index] = answers, finished
    out.seconds = time.perf_counter() - start
    return out
