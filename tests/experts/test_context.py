"""Prompt text: formatting of results, truncation invariants, and the caption expert's two modes."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from experts import TRUNCATION_MARKER, ExpertResult, format_context, truncate_to_budget
from experts.base import Caption, Detection, OcrLine
from experts.caption import CaptionExpert, create, grounded_caption

RESULTS = [
    ExpertResult("detection", "Objects detected (position, confidence): 2 horses (left 90%, right 66%)"),
    ExpertResult("ocr", "", status="timeout", error="no result within 2.00 s"),
    ExpertResult("caption", "Caption: two horses in a field", status="cached"),
    ExpertResult("empty", "   "),
]


def test_format_context_keeps_order_and_drops_failed_or_empty():
    assert format_context(RESULTS) == (
        "Objects detected (position, confidence): 2 horses (left 90%, right 66%)\nCaption: two horses in a field"
    )
    assert format_context(RESULTS, header="Context:").startswith("Context:\nObjects detected")
    assert format_context(RESULTS[1:2], header="Context:") == ""


def words(s: str) -> int:
    return len(s.split())


def test_truncate_leaves_fitting_text_alone():
    text = "one two three"
    assert truncate_to_budget(text, 3, words) is text


def test_truncate_cuts_at_a_word_boundary_with_a_marker():
    text = "Objects detected: 3 horses (left, centre, right)\nText in image (OCR):\n1. Hello World"
    assert truncate_to_budget(text, 6, len) == ""  # not even the marker fits
    assert truncate_to_budget(text, 12, len) == TRUNCATION_MARKER
    assert truncate_to_budget(text, 40, len) == "Objects detected: 3 horses " + TRUNCATION_MARKER
    assert truncate_to_budget(text, 2, words) == "Objects " + TRUNCATION_MARKER
    assert truncate_to_budget(text, 8, words) == "Objects detected: 3 horses (left, centre, right)\n" + TRUNCATION_MARKER
    assert truncate_to_budget(text, 9, words) == (
        "Objects detected: 3 horses (left, centre, right)\nText " + TRUNCATION_MARKER)


@pytest.mark.parametrize("seed", range(20))
def test_truncate_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    vocab = ["horse", "dog", "(left", "90%),", "Text", "in", "image:", "\n1.", "Hello", "World", "€", "ÿ"]
    text = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 80)))

    def lumpy(s: str) -> int:  # a counter that is not monotone in prefix length, like merging tokenisers
        return len(s.encode()) // 3 + (len(s) % 4 == 1) * 3

    for count in (len, words, lumpy):
        full = count(text)
        for budget in {0, 1, 3, 5, full // 3, full // 2, full - 1, full, full + 5}:
            out = truncate_to_budget(text, budget, count)
            assert count(out) <= budget
            if full <= budget:
                assert out == text
            elif out:
                assert out.endswith(TRUNCATION_MARKER)
                assert text.startswith(out[: -len(TRUNCATION_MARKER)].rstrip())


def test_grounded_caption_sentence():
    dets = [Detection("horse", 0.9, (0, 0, 1, 1))] * 3 + [Detection("umbrella", 0.5, (0, 0, 1, 1))]
    lines = [OcrLine("STOP", 0.9, (0, 0, 1, 1))]
    assert grounded_caption(dets, lines) == 'A picture of three horses and an umbrella, with the text "STOP".'
    assert grounded_caption([], lines) == 'An image with the text "STOP".'
    assert grounded_caption([], []) == ""
    long_text = [OcrLine("x" * 200, 0.9, (0, 0, 1, 1))]
    assert len(grounded_caption([], long_text)) < 120


def test_caption_expert_grounded_mode_is_labelled():
    expert = CaptionExpert()
    assert expert.grounded and expert.depends_on == ("detection", "ocr")
    inputs = {
        "detection": ExpertResult("detection", "...", (Detection("dog", 0.4, (0, 0, 1, 1)),)),
        "ocr": ExpertResult("ocr", "...", (OcrLine("Hello", 0.9, (0, 0, 1, 1)),)),
    }
    result = expert.run_with(Image.new("RGB", (4, 4)), "", inputs)
    assert result.text == (
        'Caption (from object detection and OCR, not a trained captioner): A picture of a dog, with the text "Hello".'
    )
    assert result.data == (Caption('A picture of a dog, with the text "Hello".', "grounded"),)
    assert expert.run(Image.new("RGB", (4, 4)), "").text == ""


def test_caption_expert_uses_the_injected_captioner():
    seen = []

    def generate(image):
        seen.append(image.size)
        return "  A dog  next to a bicycle.\n"

    expert = create({"generate_caption": generate, "source": "LLaMA-Adapter CAPTION-7B"})
    assert not expert.grounded and expert.depends_on == ()
    result = expert.run(Image.new("RGB", (7, 5)), "what is here?")
    assert result.text == "Caption: A dog next to a bicycle."
    assert result.data == (Caption("A dog next to a bicycle.", "LLaMA-Adapter CAPTION-7B"),)
    assert seen == [(7, 5)]
    with pytest.raises(TypeError):
        create({"generate_caption": "not callable"})
    with pytest.raises(ValueError, match="unknown caption options"):
        create({"prompt": "x"})


def test_result_to_dict_is_json_ready():
    import json

    r = ExpertResult("detection", "t", (Detection("dog", 0.5, (1.0, 2.0, 3.0, 4.0)),), 0.123456)
    d = r.to_dict()
    assert d["data"] == [{"type": "Detection", "label": "dog", "score": 0.5, "box": (1.0, 2.0, 3.0, 4.0)}]
    assert d["seconds"] == 0.1235 and d["status"] == "ok" and d["error"] is None
    json.dumps(d)
