"""The README's config reference documents every field of the `selfee:` schema."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from selfee_plugin.args import PromptDataset, SelfeeConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
