"""The SELFEE demo, outside the plugin's wheel: a sorting task with a programmatic gold score, tiny local models.

Run it from the repository root with `PYTHONPATH=examples python -m selfee_demo.run` (what `demo.sh` does).
"""

from .task import gold_score

__all__ = ["build_demo", "evaluate_policy", "gold_score", "load_policy", "score_pairs_accuracy"]


def __getattr__(name):
    # build/evaluate pull in transformers and TRL; load them on first use, not when only the task is needed.
    if name == "build_demo":
        from .build import build_demo

        return build_demo
    if name in ("evaluate_policy", "load_policy", "score_pairs_accuracy"):
        from . import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
