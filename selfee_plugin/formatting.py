"""Text formats: prompts and answers rendered as Axolotl's DPO strategies render them, tokenized as TRL 1.9 does."""

from __future__ import annotations

from ._logging import get_logger

LOG = get_logger(__name__)

# Axolotl's `chat_template.default` DPO strategy renders each answer after this user turn and cuts at its content.
DUMMY_USER_MESSAGE = {"role": "user", "content": "[[dummy_message]]"}


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (many chat models define no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def format_prompt(tokenizer, messages: list[dict]) -> str:
    """Render the prompt turns with the generation prompt, as Axolotl's `chat_template.default` DPO strategy does."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def format_completion(tokenizer, content: str) -> str:
    """Render one assistant answer as Axolotl's `chat_template.default` does: from its content to the end of turn.

    Axolotl cuts at `rendered.find(content)`, which for a short answer such as "a" can match inside the dummy turn
    or the assistant header; the search starts after the generation prompt instead (after the dummy turn when the
    template renders the two differently), which gives the same string whenever Axolotl's is right.
    """
    rendered = tokenizer.apply_chat_template(
        [DUMMY_USER_MESSAGE, {"role": "assistant", "content": content}], add_generation_prompt=False, tokenize=False
    )
    header = format_prompt(tokenizer, [DUMMY_USER_MESSAGE])
    if rendered.startswith(header):
        offset = len(header)
    else:
        offset = rendered.find(DUMMY_USER_MESSAGE["content"]) + len(DUMMY_USER_MESSAGE["content"])
    start = rendered.find(content, offset)
    if start < 0:
        start = rendered.find(content)
    return rendered[start:].rstrip()


def preference_formatter(tokenizer, strategy: str = "chat_template.default", ds_cfg: dict | None = None):
    """One of Axolotl's own DPO strategies as a function: raw preference row -> prompt/chosen/rejected strings.

    Args:
        strategy: an Axolotl DPO `type:` (`chat_template.default`, `chatml.intel`, ...).
        ds_cfg: the dataset entry's options (`field_messages`, `roles`, ...), as in Axolotl's `datasets:`.

    Raises:
        ValueError: Axolotl has no DPO strategy of that name.
    """
    import inspect

    from axolotl.prompt_strategies.dpo import load as load_dpo_strategy
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({"datasets": [DictDefault(dict(ds_cfg or {}))]})
    transform = load_dpo_strategy(strategy, cfg, dataset_idx=0)
    if transform is None:
        raise ValueError(f"{strategy!r} is not an Axolotl DPO dataset type (see the warning above for why).")
    transform = transform[0] if isinstance(transform, tuple) else transform
    kwargs = {"tokenizer": tokenizer} if "tokenizer" in inspect.signature(transform).parameters else {}
    return lambda row: transform(dict(row), **kwargs)


def format_preference_rows(
    rows: list[dict], tokenizer, strategy: str = "chat_template.default", ds_cfg: dict | None = None
) -> list[dict]:
    """Format raw preference rows (e.g. messages/chosen/rejected for `chat_template.default`) into prompt/chosen/
    rejected strings with one of Axolotl's own DPO strategies (see `preference_formatter`)."""
    formatter = preference_formatter(tokenizer, strategy, ds_cfg)
    return [formatter(row) for row in rows]


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a formatted prompt, exactly as TRL 1.9's `DPOTrainer._prepare_dataset` builds `prompt_ids`."""
    from trl.data_utils import _tokenize

    return list(_tokenize(tokenizer, prompt)["input_ids"])


def tokenize_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of a formatted (prompt, completion) pair, exactly as TRL 1.9's DPO training sees them.

    TRL appends EOS to a completion that lacks it, tokenizes `prompt` and `prompt + completion` (non-conversational
    path) and keeps the tail after the prompt's length. Axolotl's double-BOS fix (`AxolotlDPOTrainer._tokenize`)
    is not reproduced: TRL 1.9 calls the module-level `trl.data_utils._tokenize`, so that override never runs.

    Returns:
        prompt_ids, completion_ids: the ids `DataCollatorForPreference` concatenates.
    """
    from trl.data_utils import _tokenize

    if not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    full_ids = list(_tokenize(tokenizer, prompt + completion)["input_ids"])
    if full_ids[: len(prompt_ids)] != prompt_ids:
        LOG.debug("prompt tokens differ at the prompt/completion boundary; following TRL's split by length")
    return prompt_ids, full_ids[len(prompt_ids) :]
