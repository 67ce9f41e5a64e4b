"""A third-party expert used by the tests: names the image's average colour.

It is "installed" by putting this folder on sys.path: `lamina_colour_expert-0.1.0.dist-info/entry_points.txt`
declares it under the `lamina.experts` group exactly as a pip-installed package's metadata would.
"""

from __future__ import annotations

from experts.base import ExpertResult

PALETTE = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (200, 30, 30), "green": (30, 160, 60),
           "blue": (30, 60, 200), "grey": (128, 128, 128), "yellow": (230, 210, 40)}


class ColourExpert:
    name = "colour"

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def run(self, image, question):
        r, g, b = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
        best = min(PALETTE, key=lambda k: sum((x - y) ** 2 for x, y in zip(PALETTE[k], (r, g, b), strict=True)))
        return ExpertResult(self.name, f"{self.prefix}: {best}", ((r, g, b),))


def create(config):
    return ColourExpert(config.get("prefix", "Main colour"))
