"""Entry-point discovery: built-ins register like third parties, and a plug-in package is found and used."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image

from experts import UnknownExpertError, available_experts, create_expert, create_runner, format_context
from experts.registry import BUILTINS

PLUGIN_DIR = Path(__file__).parent / "plugin"


@pytest.fixture
def colour_plugin_installed(monkeypatch):
    """Install the test package by putting its folder (code + .dist-info) on sys.path; no network, no pip."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    yield
    import sys

    sys.modules.pop("lamina_colour_expert", None)


def test_builtins_are_registered_through_entry_points():
    installed = available_experts()
    assert set(BUILTINS) <= set(installed)
    assert installed["ocr"].value == "experts.ocr:create"
    assert installed["detection"].value == "experts.detection:create"
    assert installed["caption"].value == "experts.caption:create"


def test_third_party_expert_is_discovered_and_used(colour_plugin_installed):
    assert available_experts()["colour"].value == "lamina_colour_expert:create"
    runner = create_runner(["caption", "colour"], {"colour": {"prefix": "Dominant colour", "timeout": 2.0}})
    results = asyncio.run(runner.run(Image.new("RGB", (8, 8), (20, 50, 210)), None, "what colour?"))
    assert [(r.name, r.status) for r in results] == [("caption", "ok"), ("colour", "ok")]
    assert format_context(results) == "Dominant colour: blue"  # grounded caption has nothing to ground on


def test_unknown_expert_is_a_clear_error():
    with pytest.raises(UnknownExpertError, match=r"no expert named 'colour' is installed; installed: \["):
        create_expert("colour")


def test_factory_must_return_an_expert_with_a_matching_name(colour_plugin_installed, monkeypatch):
    import lamina_colour_expert

    monkeypatch.setattr(lamina_colour_expert, "create", lambda config: object())
    with pytest.raises(TypeError, match="lacks name/run"):
        create_expert("colour")

    class Renamed(lamina_colour_expert.ColourExpert):
        name = "color"

    monkeypatch.setattr(lamina_colour_expert, "create", lambda config: Renamed("x"))
    with pytest.raises(ValueError, match="calls itself 'color'"):
        create_expert("colour")


def test_create_runner_applies_per_expert_timeouts_and_default(colour_plugin_installed):
    runner = create_runner(["caption", "colour"], {"colour": {"timeout": 0.5}}, default=["colour"], timeout=3)
    assert runner.names == ("caption", "colour") and runner.default == ("colour",)
    assert runner._timeouts == {"caption": 3.0, "colour": 0.5}
