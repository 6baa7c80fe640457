"""Keep bitsandbytes' 4-bit layers off the AVX512-BF16 CPU inference path, whose numbers differ from training's.

Package: bitsandbytes >=0.50,<0.51 (read and tested on 0.50.2).
Upstream: `bitsandbytes/nn/modules.py` `Linear4bit.forward` repacks the weight in place for a fused bf16 CPU kernel
    the first time it runs on CPU with `not self.training` and an input without grad, when `has_avx512bf16()` (stored
    per layer as `support_avx512bf16_for_cpu`). No upstream issue filed yet.
What breaks without it: SELFEE runs the policy in eval mode under no_grad to generate and judge, so on CPUs with
    AVX512-BF16 (e.g. AMD EPYC) the first judgment (1) crashes on layers narrower than the packing block
    (`shape '[32, 0]' is invalid` in `_convert_weight_packed_for_cpu`), (2) otherwise computes in bf16, so judged
    log-probs no longer equal the training forward's, and (3) leaves the weight packed: training then goes through
    the packed kernel, which passes no gradient to the layer's input, so LoRA layers before it stop learning, silently.
Fix: set `support_avx512bf16_for_cpu = False` on every `Linear4bit` of the model after it is loaded.
Delete when: the packed path is only taken on an explicit opt-in upstream, or keeps autograd and training's numbers.
"""

from __future__ import annotations


from packaging.version import Version

from . import installed_version as _installed_version
from . import version_in_range

PACKAGE = "bitsandbytes"
VERSIONS = (Version("0.50"), Version("0.51"))  # [low, high)
ATTRIBUTE = "support_avx512bf16_for_cpu"


def installed_version() -> Version | None:
    return _installed_version(PACKAGE)


def in_range(installed: Version | None = None) -> bool:
    return version_in_range(PACKAGE, VERSIONS, installed)


def apply(model, log=None) -> int:
    """Disable CPU weight packing on every 4-bit layer of `model`; idempotent.

    Returns:
        the number of layers changed (0 outside the version range, or when none needed it).
    """
    installed = installed_version()
    if installed is None:
        return 0
    if not in_range(installed):
        if log is not None:
            log.info(f"patches: {PACKAGE} {installed} is outside {VERSIONS[0]}..{VERSIONS[1]}; CPU packing patch not applied")
        return 0
    from bitsandbytes.nn import Linear4bit

    changed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, ATTRIBUTE, False):
            setattr(module, ATTRIBUTE, False)
            changed += 1
    if changed and log is not None:
        log.info(f"patches: {PACKAGE} {installed}: CPU bf16 weight packing disabled on {changed} 4-bit layer(s)")
    return changed
