"""The KDFUSE_* environment (kdfuse.env): defaults, every knob, bad values naming the variable,
and memory budgets written as bytes, units or a fraction."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import GiB

import autotune
from kdfuse import env

pytestmark = pytest.mark.usefixtures("tuning_env")


def test_settings_defaults_and_knobs(monkeypatch, tmp_path):
    cfg = env.settings()
    assert cfg == env.Settings(True, tmp_path / "cache", False, False, None)
    monkeypatch.delenv("KDFUSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert env.settings().cache_dir == autotune.default_cache_dir("kdfuse") == tmp_path / "xdg" / "kdfuse"
    monkeypatch.setenv("KDFUSE_AUTOTUNE", "0")
    monkeypatch.setenv("KDFUSE_PRINT_AUTOTUNING", "yes")
    monkeypatch.setenv("KDFUSE_FORCE_RETUNE", "On")
    monkeypatch.setenv("KDFUSE_MEMORY_BUDGET", "0.5")
    monkeypatch.setenv("KDFUSE_CACHE_DIR", "~/kd")
    assert env.settings() == env.Settings(False, Path.home() / "kd", True, True, 0.5)


@pytest.mark.parametrize(
    ("name", "value"), [("AUTOTUNE", "maybe"), ("FORCE_RETUNE", "2"), ("MEMORY_BUDGET", "lots"), ("MEMORY_BUDGET", "0")]
)
def test_settings_bad_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(env.PREFIX + name, value)
    with pytest.raises(ValueError, match=env.PREFIX + name):
        env.settings()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5", 0.5),
        ("1", 1.0),
        ("8000000000", 8 * 10**9),
        ("8e9", 8 * 10**9),
        ("16GiB", 16 * GiB),
        ("512 MB", 512 * 10**6),
        ("0.5GiB", GiB // 2),
    ],
)
def test_parse_memory_budget(text, expected):
    value = env.parse_memory_budget(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["", "-1", "0", "1.5", "inf", "nan", "12 parsecs", "1b", "GiB"])
def test_parse_memory_budget_rejects(text):
    with pytest.raises(ValueError):
        env.parse_memory_budget(text)
