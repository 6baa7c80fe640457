"""Loggers under Axolotl's namespace, so its log config shows our INFO lines (it filters others to WARNING)."""

from axolotl.utils.logging import get_logger as _axolotl_get_logger


def get_logger(name: str):
    return _axolotl_get_logger(f"axolotl.integrations.{name}")
