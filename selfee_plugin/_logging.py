"""Loggers under Axolotl's namespace, so its log config shows our INFO lines (it filters others to WARNING)."""

import logging


def get_logger(name: str):
    try:
        from axolotl.utils.logging import get_logger as axolotl_get_logger
    except ImportError:  # generation/judgment/benchmarks also run where Axolotl is not installed (a GPU box)
        return logging.getLogger(f"axolotl.integrations.{name}")
    return axolotl_get_logger(f"axolotl.integrations.{name}")
