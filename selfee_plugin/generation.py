"""Sampling responses from the current policy: the sampler interface and its HF backend."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ._logging import get_logger
from .artifacts import PROMPT_TOO_LONG
from .config_blocks import AUTO_MAX_SEQUENCES
from .formatting import format_prompt, pad_token_id, tokenize_prompt
from .logprobs import eval_mode
from .memory import auto_batch_sequences, is_out_of_memory, sequence_bytes
from .merging import merged_copy, should_merge
from .static_decoding import StaticDecoder

LOG = get_logger(__name__)


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
        batch_prompts: prompts per generate() call actually used (after any out-of-memory halving).
    """

    prompts: list[str]
    responses: list[list[str] | None]
    finished: list[list[bool] | None]
    skipped: dict[int, str] = field(default_factory=dict)
    generated_tokens: int = 0
    seconds: float = 0.0
    batch_prompts: int = 0


class Sampler(Protocol):
    """What the round loop needs from a generation backend (`selfee.generation.backend`)."""

    def generate(self, prompts: list[list[dict]], n: int, seed: int) -> Generations:
        """Sample `n` answers per prompt (chat turns ending before the answer), reproducibly for a given seed."""


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids that end an answer: the tokenizer's EOS plus any the model's generation config lists (end of turn)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def _sampling_kwargs(gen_cfg, n: int, stop_ids: list[int], pad_id: int) -> dict:
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
        "pad_token_id": pad_id,
        "use_cache": True,
    }


class HFSampler:
    """transformers `generate` on the policy (or, with `generation.merge_adapter`, on a merged copy of it).

    Prompts are rendered with the chat template's generation prompt and tokenized as DPO training will; those longer
    than `max_prompt_length` tokens are skipped (never truncated). Batches are left padded by hand (the tokenizer's
    padding side is never touched), sorted by length to waste little padding, and sampled with the KV cache under a
    forked RNG seeded per call, so the caller's RNG state is unchanged and the same seed, prompts and batch size give
    the same answers. An out-of-memory error halves the batch and retries the same prompts; the smaller size is kept.
    Batches that `static_decoding.StaticDecoder` samples exactly as `generate` would are decoded by it (on CUDA).
    """

    def __init__(self, model, tokenizer, gen_cfg, progress: bool = False):
        self.model, self.tokenizer, self.cfg, self.progress = model, tokenizer, gen_cfg, progress
        self.batch_prompts = None if gen_cfg.batch_size == "auto" else gen_cfg.batch_size
        self.static_decoder = StaticDecoder()

    def _plan_batch(self, model, longest_prompt: int, n: int) -> int:
        if self.batch_prompts is None:
            sequences = auto_batch_sequences(model, longest_prompt, self.cfg.max_new_tokens)
            self.batch_prompts = max(1, sequences // n)
            LOG.info(f"selfee generation: batch_size auto -> {self.batch_prompts} prompts x {n} samples")
        return self.batch_prompts

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], n: int, seed: int) -> Generations:
        tokenizer, cfg = self.tokenizer, self.cfg
        pad_id = pad_token_id(tokenizer)
        texts = [format_prompt(tokenizer, m) for m in prompts]
        out = Generations(prompts=texts, responses=[None] * len(texts), finished=[None] * len(texts))
        kept = []
        for i, text in enumerate(texts):
            ids = tokenize_prompt(tokenizer, text)
            if len(ids) > cfg.max_prompt_length:
                out.skipped[i] = PROMPT_TOO_LONG
            else:
                kept.append((i, ids))
        if out.skipped:
            LOG.info(f"skipped {len(out.skipped)} prompt(s) longer than {cfg.max_prompt_length} tokens")
        if not kept:
            return out
        kept.sort(key=lambda item: len(item[1]), reverse=True)

        start = time.perf_counter()
        with self._sampling_model(len(kept[0][1]), n) as sampling_model:
            stop_ids = stop_token_ids(sampling_model, tokenizer)
            kwargs = _sampling_kwargs(cfg, n, stop_ids, pad_id)
            device = next(sampling_model.parameters()).device
            self._plan_batch(sampling_model, len(kept[0][1]), n)
            devices = [device] if device.type == "cuda" else []
            with eval_mode(sampling_model), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                position = 0
                with tqdm(total=len(kept), desc="selfee generate", disable=not self.progress) as bar:
                    while position < len(kept):
                        # Every batch runs until its longest answer ends, so the prompts left are split evenly
                        # (116 + 12 would take as many decode steps as 64 + 64, with more memory).
                        left = len(kept) - position
                        size = -(-left // -(-left // self.batch_prompts))
                        batch = kept[position : position + size]
                        try:
                            sequences = self._generate_batch(sampling_model, batch, pad_id, device, kwargs)
                        except RuntimeError as error:
                            if not is_out_of_memory(error) or self.batch_prompts == 1:
                                raise
                            sequences = None  # the traceback (and the batch's tensors) is freed when this block ends
                        if sequences is None:
                            self.batch_prompts //= 2
                            LOG.warning(f"selfee generation: out of memory; retrying with {self.batch_prompts} prompts")
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                            continue
                        self._collect(out, batch, sequences, n, stop_ids)
                        position += len(batch)
                        bar.update(len(batch))
        out.seconds = time.perf_counter() - start
        out.batch_prompts = self.batch_prompts
        return out

    @contextmanager
    def _sampling_model(self, longest_prompt: int, n: int):
        model, cfg = self.model, self.cfg
        needed = 0
        if cfg.merge_adapter is not False and next(model.parameters()).device.type == "cuda":
            sequences = self.batch_prompts * n if self.batch_prompts else min(
                AUTO_MAX_SEQUENCES, auto_batch_sequences(model, longest_prompt, cfg.max_new_tokens)
            )
            needed = sequences * sequence_bytes(model.config, longest_prompt + cfg.max_new_tokens, longest_prompt)
        if not should_merge(model, cfg, needed):
            yield model
            return
        merged = merged_copy(model)
        try:
            yield merged
        finally:  # freed before judging: the judge needs that memory for its own batches
            del merged
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _generate_batch(self, model, batch, pad_id, device, kwargs) -> torch.Tensor:
        from trl.trainer.utils import pad  # seconds to import: only once sampling starts

        input_ids = pad([torch.tensor(ids) for _, ids in batch], pad_id, "left").to(device)
        attention_mask = pad([torch.ones(len(ids), dtype=torch.long) for _, ids in batch], 0, "left").to(device)
        if self.static_decoder.supports(model, input_ids, kwargs):
            return self.static_decoder.sample(model, input_ids, attention_mask, kwargs).cpu()
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return sequences[:, input_ids.shape[1] :].cpu()  # (B * n, T), the n sequences of a prompt adjacent

    def _collect(self, out: Generations, batch, new_tokens: torch.Tensor, n: int, stop_ids: list[int]) -> None:
        for row, (index, _) in enumerate(batch):
            answers, finished = [], []
            for ids in new_tokens[row * n : (row + 1) * n].tolist():
                stop = next((k for k, tok in enumerate(ids) if tok in stop_ids), None)
                finished.append(stop is not None)
                ids = ids if stop is None else ids[: stop + 1]
                out.generated_tokens += len(ids)
                answers.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
            out.responses[index], out.finished[index] = answers, finished


SAMPLERS = {"hf": HFSampler}


def make_sampler(model, tokenizer, gen_cfg, progress: bool = False) -> Sampler:
    """The sampler `selfee.generation.backend` names."""
    return SAMPLERS[gen_cfg.backend](model, tokenizer, gen_cfg, progress=progress)


def generate_responses(model, tokenizer, prompts, gen_cfg, n: int, seed: int, progress: bool = False) -> Generations:
    """Sample `n` answers per prompt with the configured backend (see `HFSampler`)."""
    return make_sampler(model, tokenizer, gen_cfg, progress).generate(prompts, n, seed)
