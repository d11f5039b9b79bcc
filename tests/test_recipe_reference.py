"""docs/recipe-keys.md is generated from the config dataclasses: it must be current and say what every key means."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from sedd_scale.config.recipe import Recipe
from sedd_scale.config.reference import field_comments, reference_markdown

PAGE = Path(__file__).resolve().parents[1] / "docs" / "recipe-keys.md"


def test_reference_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/recipe-keys.md is stale: python -m sedd_scale.config.reference > docs/recipe-keys.md")


def test_every_key_is_documented():
    hints = typing.get_type_hints(Recipe)
    missing = [f"{section.name}.{f.name}" for section in dataclasses.fields(Recipe)
               for f in dataclasses.fields(hints[section.name])
               if not field_comments(hints[section.name]).get(f.name)]
    assert not missing, f"write a comment beside each of these fields (it is the key's reference entry): {missing}"


def test_comments_are_read_beside_and_above_fields():
    @dataclasses.dataclass
    class Probe:
        a: int = 1  # beside a
        # above b,
        # two lines
        b: int = 2

        c: int = 3
        d: int = 4  # d has a # inside

    assert field_comments(Probe) == {"a": "beside a", "b": "above b, two lines", "d": "d has a # inside"}
