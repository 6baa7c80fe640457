"""SELFEE / SPA self-annotated preference alignment as an Axolotl plugin."""

from .args import SelfeeArgs, SelfeeConfig
from .plugin import SelfeePlugin

__all__ = ["SelfeeArgs", "SelfeeConfig", "SelfeePlugin"]
