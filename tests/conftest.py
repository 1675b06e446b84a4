"""Shared fixtures: a minimal valid configuration written to a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

MINIMAL_CONFIG = """\
[storage]
root = "{root}"
budget = "10 GB"

[photometry]
catalog_dir = "{catalog}"
"""


@pytest.fixture
def minimal_config_text(tmp_path: Path) -> str:
    return MINIMAL_CONFIG.format(root=tmp_path / "store", catalog=tmp_path / "refcat")


@pytest.fixture
def minimal_config(tmp_path: Path, minimal_config_text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(minimal_config_text)
    return path
