"""Everything checked before any weights load (`preflight`): parallelism, the prompt pool, seed rows Axolotl would
train on silently wrong, seed prompts formatted unlike the rounds' chat template, a `judge.reference_model` that
does not share the policy's tokenizer, held-out judge pairs, and resume."""

from __future__ import annotations

from ._logging import get_logger
from .context import RunContext
from .distributed import check_parallelism
from .formatting import DUMMY_USER_MESSAGE, format_prompt, preference_formatter
from .judge import load_eval_pairs
from .judged_pairs_entry import TYPE_NAME as JUDGED_PAIRS_TYPE
from .prompt_pool import describe_load_error, load_prompt_pool
from .resume import check_resume

LOG = get_logger(__name__)

SHOWN = 5  # bad rows listed per dataset


def _row_problems(row: dict) -> list[str]:
    problems = []
    for key in ("prompt", "chosen", "rejected"):
        value = row.get(key)
        if not isinstance(value, str):
            problems.append(f"`{key}` is missing")
        elif key != "prompt" and DUMMY_USER_MESSAGE["content"] in value:
            # Axolotl's chat_template.default renders an empty answer as the whole dummy conversation.
            problems.append(f"`{key}` is empty (Axolotl would train on its {DUMMY_USER_MESSAGE['content']} turn)")
        elif key != "prompt" and not value.strip():
            problems.append(f"`{key}` is empty")
    return problems


def check_seed_datasets(cfg, tokenizer) -> list[list[dict]]:
    """Format every seed row with its Axolotl DPO type and refuse rows that would train on nothing or a placeholder.

    Returns:
        per `datasets[i]`, the formatted rows (prompt/chosen/rejected strings).

    Raises:
        ValueError: naming `datasets[i]`, the file, the first bad rows (0-based, as the loader counts them) and why.
    """
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault

    formatted = []
    for idx, entry in enumerate(cfg.get("datasets") or []):
        entry = dict(entry)
        key, path, kind = f"datasets[{idx}]", entry.get("path"), entry.get("type")
        if not isinstance(kind, str) or kind == JUDGED_PAIRS_TYPE:
            # user_defined dicts: Axolotl's own loader checks them; judged pairs check their own rows (batched).
            formatted.append([])
            continue
        try:
            rows = list(load_dataset_with_config(DictDefault({"split": "train", **entry}), use_auth_token=False))
        except Exception as error:
            raise ValueError(describe_load_error(key, str(path), error)) from error
        try:
            formatter = preference_formatter(tokenizer, kind, entry)
        except ValueError as error:
            raise ValueError(f"{key} ({path}): {error}") from error
        out, bad = [], []
        for row_idx, row in enumerate(rows):
            try:
                formatted_row = formatter(row)
            except Exception as error:
                raise ValueError(
                    f"{key} ({path}) row {row_idx} cannot be formatted with type {kind}: {type(error).__name__}: "
                    f"{error}. Row keys: {sorted(row)}."
                ) from error
            problems = _row_problems(formatted_row)
            if problems:
                bad.append(f"row {row_idx}: {'; '.join(problems)}")
            out.append(formatted_row)
        if bad:
            raise ValueError(
                f"{key} ({path}) has {len(bad)} seed pair(s) that cannot be trained on: {' | '.join(bad[:SHOWN])}"
                f"{' | ...' if len(bad) > SHOWN else ''}. Fix or drop these rows."
            )
        formatted.append(out)
    return formatted


def warn_on_format_mismatch(cfg, tokenizer, formatted: list[list[dict]]) -> bool:
    """Warn when a seed dataset's prompts do not end the way the chat template's generation prompt does.

    Rounds render prompts with the tokenizer's chat template; a fixed-format seed type (`chatml.intel`,
    `llama3.intel`, `user_defined`, ...) can render them differently, and DPO then teaches two formats.

    Returns:
        whether a warning was logged.
    """
    probe = "SELFEE_FORMAT_PROBE"
    rendered = format_prompt(tokenizer, [{"role": "user", "content": probe}])
    suffix = rendered[rendered.rfind(probe) + len(probe) :].strip()
    warned = False
    for idx, rows in enumerate(formatted):
        mismatched = [r["prompt"] for r in rows if suffix and not r["prompt"].rstrip().endswith(suffix)]
        if mismatched:
            kind = dict(cfg["datasets"][idx]).get("type")
            LOG.warning(
                f"datasets[{idx}] (type {kind}) renders {len(mismatched)} of {len(rows)} seed prompts differently from "
                f"the chat template the rounds generate with: a seed prompt ends {mismatched[0][-80:]!r}, a round "
                f"prompt ends {rendered[-80:]!r}. DPO would then train on two formats; use a chat_template.* type or "
                "set `chat_template` to the format of the seed data."
            )
            warned = True
    return warned


def check_reference_model(cfg, reference_model: str, tokenizer) -> None:
    """`judge.reference_model` scores the policy's token ids, so it must read them as the same tokens; checked from
    its config and tokenizer files, without its weights.

    Raises:
        ValueError: naming `selfee.judge.reference_model`: not a readable model, an embedding smaller than the
            policy's tokenizer, or a tokenizer that gives a shared token another id.
    """
    from transformers import AutoConfig, AutoTokenizer

    key = f"selfee.judge.reference_model ({reference_model})"
    remote = bool(cfg.get("trust_remote_code"))
    try:
        config = AutoConfig.from_pretrained(reference_model, trust_remote_code=remote)
    except Exception as error:
        raise ValueError(
            f"{key} cannot be read as a model: {type(error).__name__}: {error}. Give the directory of a saved causal "
            "LM (config.json + weights) or a hub id."
        ) from error
    fix = (
        "The judge scores the policy's token ids under both models: use a reference with the policy's tokenizer, "
        "e.g. the base model the policy was tuned from."
    )
    embeddings = getattr(config.get_text_config(), "vocab_size", None)
    if embeddings is not None and len(tokenizer) > embeddings:
        raise ValueError(
            f"{key} has {embeddings} token embeddings, fewer than the {len(tokenizer)} tokens of the policy's "
            f"tokenizer (tokens added to the policy would index past the reference's embedding). {fix}"
        )
    try:
        reference_tokenizer = AutoTokenizer.from_pretrained(reference_model, trust_remote_code=remote)
    except Exception:  # a model saved without tokenizer files: its embedding size is all there is to check
        return
    ours, theirs = tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    moved = sorted(token for token in ours.keys() & theirs.keys() if ours[token] != theirs[token])
    if moved:
        token = moved[0]
        raise ValueError(
            f"{key} has another tokenizer: {len(moved)} token(s) have other ids, e.g. {token!r} is "
            f"{ours[token]} for the policy and {theirs[token]} for the reference. {fix}"
        )


def preflight(run: RunContext) -> None:
    """Run every check that needs no weights, in seconds, from the plugin's `pre_model_load`, and fill `run`: the
    prompt pool, the resume state and the held-out judge pairs of a file (`auto` ones come from the seed loading).

    Raises:
        ValueError: naming the key or file and row, the value and what is allowed.
    """
    cfg, selfee = run.cfg, run.selfee
    check_parallelism(cfg)  # ZeRO-3 / FSDP / tensor or context parallelism
    if selfee.round_sizes and run.pool is None:
        run.pool = load_prompt_pool(selfee, selfee.round_sizes)
        LOG.info(f"selfee: prompt pool of {len(run.pool)} prompts for rounds {selfee.round_sizes}")
    reference_model, eval_pairs = selfee.judge.reference_model, selfee.judge.eval_pairs
    if cfg.get("datasets") or reference_model or isinstance(eval_pairs, dict):
        from axolotl.loaders.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg)
        if cfg.get("datasets"):
            warn_on_format_mismatch(cfg, tokenizer, check_seed_datasets(cfg, tokenizer))
        if reference_model:
            check_reference_model(cfg, reference_model, tokenizer)
        if isinstance(eval_pairs, dict):
            run.eval_rows = load_eval_pairs(eval_pairs, tokenizer)
    run.state = check_resume(cfg, selfee, run.pool)
    if run.state["completed"]:
        LOG.info(f"selfee: resuming {cfg.output_dir}; finished rounds {sorted(run.state['completed'])}")
