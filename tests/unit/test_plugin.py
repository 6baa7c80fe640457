"""The plugin in `axolotl train`'s config step: a bad `selfee:` block fails before any model loads.

Training through the CLI with the plugin is covered by the e2e tests of tests/test_rounds.py and
tests/test_example_configs.py.
"""

from __future__ import annotations

import pytest
import yaml
from helpers import tiny_train_config


def test_invalid_selfee_block_fails_before_model_load(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """`axolotl train cfg.yml` first runs `load_cfg` (read the YAML, load the plugins, validate, normalize), then
    loads the model. Run in process, as the CLI would: the bad block fails there, naming the key and the bound."""
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager
    from axolotl.loaders import ModelLoader

    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, str(tmp_path / "out"), selfee={"refine": {"smoothing": 0.7}})
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(ModelLoader, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(PluginManager, "_instance", None)
    with pytest.raises(ValueError) as info:
        load_cfg(str(path))
    assert "selfee.refine.smoothing" in str(info.value) and "less than 0.5" in str(info.value)
    assert "selfee_plugin.SelfeePlugin" in PluginManager.get_instance().plugins  # loaded from `plugins:` first
