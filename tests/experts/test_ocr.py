"""OCR: every backend reads the rendered test text exactly; line grouping and formatting."""

from __future__ import annotations

import json

import pytest

from experts import ocr
from experts.base import OcrLine
from tests.experts.conftest import IMAGES, load_image

TEXT_PNG = ["Hello World 2024", "LLaMA-Adapter OCR test"]
TEXT2_PNG = ["The quick brown fox jumps over the lazy dog.", "Invoice #4521: total $1,337.90 (due 2025-03-14)"]


def _lines(expert: ocr.OcrExpert, name: str) -> list[str]:
    return [" ".join(line.text.split()) for line in expert.read(load_image(name))]  # whitespace only


@pytest.fixture(scope="module")
def rapidocr_expert():
    return ocr.create({"backend": "rapidocr"})


@pytest.fixture(scope="module")
def tesseract_expert(tesseract_binary):
    return ocr.create({"backend": "tesseract"})


def test_default_backend_is_rapidocr():
    assert ocr.create().backend == "rapidocr" == ocr.DEFAULT_BACKEND


def test_rapidocr_reads_rendered_text_exactly(rapidocr_expert):
    assert _lines(rapidocr_expert, "text.png") == TEXT_PNG
    assert _lines(rapidocr_expert, "text2.png") == TEXT2_PNG


OCR_SET = json.loads((IMAGES / "ocr" / "truth.json").read_text())


@pytest.mark.parametrize("name", sorted(OCR_SET))
def test_default_backend_reads_harder_text_exactly(rapidocr_expert, name):
    """Small, coloured, rotated, low-contrast JPEG, monospace, and text on photos (scene text may add lines)."""
    got = _lines(rapidocr_expert, f"ocr/{name}")
    assert [line for line in got if line in OCR_SET[name]] == OCR_SET[name]


def test_tesseract_reads_rendered_text_exactly(tesseract_expert):
    assert _lines(tesseract_expert, "text.png") == TEXT_PNG
    assert _lines(tesseract_expert, "text2.png") == TEXT2_PNG


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # torch/easyocr internals
def test_easyocr_reads_rendered_text_exactly():
    expert = ocr.create({"backend": "easyocr"})
    assert _lines(expert, "text.png") == TEXT_PNG


def test_photo_without_text_gives_no_text(rapidocr_expert):
    result = rapidocr_expert.run(load_image("horses.jpg"), "")
    assert result.text == "" and result.data == ()


def test_expert_text_is_numbered_lines(rapidocr_expert):
    result = rapidocr_expert.run(load_image("text.png"), "what does it say?")
    assert result.text == "Text in image (OCR):\n1. Hello World 2024\n2. LLaMA-Adapter OCR test"
    assert all(isinstance(x, OcrLine) and x.score > 0.5 for x in result.data)


def test_group_lines_merges_fragments_of_one_line_left_to_right():
    frags = [
        OcrLine("second", 0.9, (10, 60, 100, 80)),
        OcrLine("lazy", 0.8, (520, 22, 590, 64)),  # slightly rotated box, as EasyOCR returns
        OcrLine("The quick", 0.95, (17, 25, 500, 63)),
        OcrLine("dog.", 0.7, (591, 25, 658, 64)),
    ]
    lines = ocr.group_lines(frags)
    assert [ln.text for ln in lines] == ["The quick lazy dog.", "second"]
    assert lines[0].score == 0.7 and lines[0].box == (17, 22, 658, 64)


def test_low_scores_are_dropped_and_options_are_checked():
    class Fake:
        def read(self, image):
            return [OcrLine("keep", 0.9, (0, 0, 10, 10)), OcrLine("noise", 0.2, (0, 20, 10, 30)),
                    OcrLine("  ", 0.99, (0, 40, 10, 50))]

    expert = ocr.OcrExpert("rapidocr", min_score=0.5)
    expert._engine = Fake()
    assert [ln.text for ln in expert.read(load_image("text.png"))] == ["keep"]
    with pytest.raises(ValueError, match="unknown OCR backend"):
        ocr.create({"backend": "paddle"})
    with pytest.raises(ValueError, match="unknown tesseract OCR options"):
        ocr.create({"backend": "tesseract", "language": "eng"})
