"""CLIP weights in both supported formats, and architectures by open_clip name or config JSON."""

import json

import torch

from models.loading import build_clip, clip_config, read_clip_weights

from .conftest import REF, load_reference


class _OpenAIStyle(torch.nn.Module):
    """Holds a `visual` tower like OpenAI's CLIP archive does (keys `visual.*`)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, x):
        return self.visual(x)


def test_openai_torchscript_archive(tmp_path, golden):
    cfg = json.loads((REF / "clip-tiny.json").read_text())
    tower = build_clip(cfg, quick_gelu=True)
    tower.load_state_dict(torch.load(REF / "clip-tiny.pt", weights_only=True))
    scripted = torch.jit.trace(_OpenAIStyle(tower.visual).eval(), torch.zeros(1, 3, 28, 28), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    scripted.save(str(path))

    sd, openai = read_clip_weights(path)
    assert openai and "conv1.weight" in sd and "proj" in sd
    lm = load_reference()
    lm_ts = load_reference_with_clip(path)
    torch.testing.assert_close(lm_ts.model.encode_image(golden["image_tensor"], 0),
                               lm.model.encode_image(golden["image_tensor"], 0), atol=0, rtol=0)


def load_reference_with_clip(clip_weights):
    from models.loading import load_llama_adapter

    return load_llama_adapter(REF / "llama" / "tiny", REF / "tokenizer.model", {"tiny": REF / "adapter.pth"},
                              clip_model=str(REF / "clip-tiny.json"), clip_weights=clip_weights)


def test_vision_only_open_clip_state_dict(golden):
    sd, openai = read_clip_weights(REF / "clip-tiny.pt")
    assert not openai and all(not k.startswith("visual.") for k in sd)


def test_open_clip_model_name_gives_the_release_architecture():
    cfg = clip_config("ViT-L-14")
    assert cfg["embed_dim"] == 768
    v = cfg["vision_cfg"]
    assert (v["layers"], v["width"], v["patch_size"], v["image_size"]) == (24, 1024, 14, 224)
    with torch.device("meta"):
        tower = build_clip(cfg, quick_gelu=True)
    assert tower.output_dim == 768 and tower.image_size == 224
    n = sum(p.numel() for p in tower.parameters())
    assert 300e6 < n < 310e6  # ViT-L/14 vision tower
