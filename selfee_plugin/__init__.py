"""SELFEE / SPA self-annotated preference alignment as an Axolotl plugin."""

from .args import SelfeeArgs, SelfeeConfig

__all__ = ["SelfeeArgs", "SelfeeConfig", "SelfeePlugin"]


def __getattr__(name):
    # The plugin class imports Axolotl; generation, judgment and the benchmarks must import without it.
    if name == "SelfeePlugin":
        from .plugin import SelfeePlugin

        return SelfeePlugin
    if name == "judged_pairs":
        # Axolotl resolves the dataset `type: selfee_plugin.judged_pairs` as this attribute; the module is callable.
        import importlib

        return importlib.import_module(".judged_pairs", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
