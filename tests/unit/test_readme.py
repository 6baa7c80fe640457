"""The README documents every field of the `selfee:` schema and the test command CI runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from selfee_plugin.args import SelfeeConfig
from selfee_plugin.config_blocks import PromptDataset

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _keys(model: type[BaseModel], prefix: str):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _keys(annotation, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}"


def test_every_selfee_key_is_in_the_readme():
    missing = [key for key in _keys(SelfeeConfig, "selfee") if f"`{key}`" not in README]
    assert not missing, f"README config reference lacks: {missing}"


def test_every_prompt_entry_key_is_in_the_readme():
    missing = [name for name in PromptDataset.model_fields if f"| `{name}` |" not in README]
    assert not missing, f"README prompt-entry reference lacks: {missing}"


def test_ci_runs_the_readmes_test_command():
    """`.ci/run` ends with the README's test command, per-test durations included."""
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "--durations=0" in command and f"Tests: `{command}`" in README
