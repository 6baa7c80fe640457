"""Run several processes on a machine without an accelerator: model on CPU, trainer on accelerate's MULTI_CPU (gloo).

Package: axolotl >=0.19,<0.20 (read and tested on 0.19.0; transformers 5.16, accelerate 1.13).
Upstream: `axolotl/utils/config/__init__.py` `normalize_config` sets `cfg.device_map = {"": int(LOCAL_RANK)}` whenever
    `world_size > 1`, overwriting the `{"": "cpu"}` that `choose_device` chose on a machine with no accelerator;
    `axolotl/loaders/model.py` `ModelLoader._set_device_map_config` passes it to `from_pretrained`, which reads an
    integer as an accelerator index. And Axolotl never sets `TrainingArguments.use_cpu`, without which accelerate 1.13
    (`PartialState._prepare_backend`) gives a CPU process `DistributedType.NO`: each process trains alone.
    No upstream issue filed yet.
What breaks without it: `axolotl train cfg.yml --launcher torchrun -- --nproc_per_node 2` on a CPU-only machine (how
    the multi-process SELFEE loop is tested here) fails in `from_pretrained` with `RuntimeError: Cannot access
    accelerator device when none is available`; with the device map alone fixed, every process would train its own
    copy on all the data, silently. GPU runs are not affected.
Fix: when `WORLD_SIZE > 1` and torch sees no accelerator: after `ModelLoader._set_device_map_config`, replace a
    `{"": <int>}` device map by `{"": "cpu"}`; and set `ACCELERATE_USE_CPU=true` (what `accelerate launch --cpu` sets),
    so `TrainingArguments` builds a MULTI_CPU state with gloo. Applied from `SelfeePlugin.register`, before the config
    is normalized and before any model loads, only in such a run.
Delete when: upstream keeps `choose_device`'s CPU map and sets `use_cpu` for multi-process CPU runs.
"""

from __future__ import annotations

import functools
import os

import torch
from packaging.version import Version

from . import installed_version as _installed_version
from . import version_in_range

PACKAGE = "axolotl"
VERSIONS = (Version("0.19"), Version("0.20"))  # [low, high)
PATCHED_FLAG = "__selfee_multiprocess_cpu__"
CPU_FLAG = "ACCELERATE_USE_CPU"


def installed_version() -> Version | None:
    return _installed_version(PACKAGE)


def in_range(installed: Version | None = None) -> bool:
    return version_in_range(PACKAGE, VERSIONS, installed)


def needed() -> bool:
    """Several processes and no accelerator: the only case upstream's placement is wrong."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def cpu_device_map(device_map):
    """`{"": "cpu"}` for an all-integer (accelerator index) device map, else `device_map` unchanged."""
    if isinstance(device_map, dict) and device_map and all(isinstance(v, int) for v in device_map.values()):
        return {key: "cpu" for key in device_map}
    return device_map


def apply(log=None) -> bool:
    """Place a multi-process CPU run on CPU (see the module docstring); idempotent.

    Returns:
        True when this call installed the fix (False: not needed, outside the version range, or already there).
    """
    installed = installed_version()
    if installed is None or not needed():
        return False
    if not in_range(installed):
        if log is not None:
            log.info(f"patches: {PACKAGE} {installed} is outside {VERSIONS[0]}..{VERSIONS[1]}; multi-process CPU "
                     "patch not applied")
        return False
    from axolotl.loaders.model import ModelLoader

    original = ModelLoader._set_device_map_config
    if getattr(original, PATCHED_FLAG, False):
        return False

    @functools.wraps(original)
    def _set_device_map_config(self):
        original(self)
        if needed():
            self.model_kwargs["device_map"] = cpu_device_map(self.model_kwargs.get("device_map"))

    setattr(_set_device_map_config, PATCHED_FLAG, True)
    ModelLoader._set_device_map_config = _set_device_map_config
    os.environ.setdefault(CPU_FLAG, "true")
    if log is not None:
        log.info(f"patches: {PACKAGE} {installed}: {os.environ['WORLD_SIZE']} processes without an accelerator: model "
                 f"loaded with device_map {{'': 'cpu'}}, {CPU_FLAG}={os.environ[CPU_FLAG]} (gloo)")
    return True
