"""SentencePiece tokenizer, incremental detokenisation, prompt templates and image preprocessing."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.preprocess import CLIP_MEAN, CLIP_STD, clip_transform
from models.prompts import format_alpaca
from models.tokenizer import IncrementalDetokenizer, SentencePieceTokenizer

from .conftest import REF


def test_sentencepiece_incremental_decode_keeps_spaces(golden):
    tok = SentencePieceTokenizer(REF / "tokenizer.model")
    ids = tok.encode("describe the image of a cat on the mat", bos=False)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids)


def test_alpaca_templates_match_the_reference(golden):
    assert format_alpaca("describe the image") == golden["prompt"]
    assert format_alpaca("what is in the picture", input="a short input") == golden["batch_prompts"][1]


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()))


def test_clip_transform_normalises_and_swaps_channels():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    x_rgb = clip_transform(_png(rgb), 28, channel_order="rgb")
    x_bgr = clip_transform(_png(rgb), 28, channel_order="bgr")
    assert x_rgb.shape == (3, 28, 28)
    want_red = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    torch.testing.assert_close(x_rgb[:, 14, 14], torch.tensor(want_red), atol=1e-5, rtol=0)
    want_blue = [-CLIP_MEAN[0] / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], (1 - CLIP_MEAN[2]) / CLIP_STD[2]]
    torch.testing.assert_close(x_bgr[:, 14, 14], torch.tensor(want_blue), atol=1e-5, rtol=0)


def test_clip_transform_applies_exif_orientation_and_crops_centre():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=100)
    rotated = clip_transform(Image.open(io.BytesIO(buf.getvalue())), 28, channel_order="rgb")
    # after the EXIF rotation the white half is on top, so the top row is bright and the bottom dark
    assert rotated[0, 1].mean() > 1.0 and rotated[0, -2].mean() < -1.0


def test_clip_transform_rejects_unknown_channel_order():
    with pytest.raises(ValueError, match="channel_order"):
        clip_transform(Image.new("RGB", (8, 8)), 8, channel_order="grb")
