"""The tiny stand-ins and the loading path: real-repo layout, processor pitfall, image tokens."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from mantis_llm import Conversation, GenerationParams, Request
from mantis_llm.testing import build_tiny_mantis, tokens_per_image


def test_build_is_cached_and_deterministic(tiny_clip, tmp_path):
    weights = tiny_clip / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert build_tiny_mantis(tiny_clip) == tiny_clip
    assert time.perf_counter() - start < 0.5
    assert weights.stat().st_mtime_ns == before  # not rebuilt

    # other arguments in the same directory: rebuilt; same seed elsewhere: same weights
    other = build_tiny_mantis(tmp_path / "again", vision="clip", seed=0)
    with safe_open(str(weights), "pt") as a, safe_open(str(other / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    build_tiny_mantis(tmp_path / "again", vision="clip", seed=1)
    with safe_open(str(weights), "pt") as a, safe_open(str(other / "model.safetensors"), "pt") as b:
        assert not all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_bad_builder_arguments(tmp_path):
    with pytest.raises(ValueError, match="vision"):
        build_tiny_mantis(tmp_path, vision="dino")
    with pytest.raises(ValueError, match="layout"):
        build_tiny_mantis(tmp_path, layout="gguf")


def test_mantis_layout_looks_like_the_tiger_lab_repo(tiny_mantis_layout):
    files = {p.name for p in tiny_mantis_layout.iterdir()}
    assert "processor_config.json" not in files
    pre = json.loads((tiny_mantis_layout / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "MLlavaProcessor"
    assert pre["image_processor_type"] == "CLIPImageProcessor"
    cfg = json.loads((tiny_mantis_layout / "config.json").read_text())
    assert cfg["transformers_version"] == "4.39.2"
    assert {"vocab_size", "ignore_index", "pad_token_id"} <= cfg.keys()
    assert "image_seq_length" not in cfg
    with safe_open(str(tiny_mantis_layout / "model.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in f.keys()}
    assert prefixes == {
        "language_model.model",
        "language_model.lm_head",
        "vision_tower.vision_model",
        "multi_modal_projector.linear_1",
        "multi_modal_projector.linear_2",
    }


def test_autoprocessor_pitfall_and_our_loader(backends, tiny_mantis_layout, tiny_clip):
    # the pitfall: AutoProcessor on a Mantis repo silently gives only the tokenizer
    auto = AutoProcessor.from_pretrained(tiny_mantis_layout)
    assert not isinstance(auto, LlavaProcessor)
    assert not hasattr(auto, "image_processor")

    # our loader: a real LlavaProcessor configured from the model's config
    backend = backends["mantis-layout"]
    proc = backend.processor
    assert isinstance(proc, LlavaProcessor)
    assert (proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy) == (8, 1, "default")
    # legacy weight names load completely: same weights as the HF-layout build with the same seed
    _, info = LlavaForConditionalGeneration.from_pretrained(tiny_mantis_layout, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours, ref = backend.hf_model.state_dict(), backends["clip"].hf_model.state_dict()
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize(
    ("variant", "vision", "per_image", "extra"),
    [("clip", "clip", 16, 1), ("siglip", "siglip", 15, 0), ("mantis-layout", "clip", 16, 1)],
)
def test_image_tokens_per_image(backends, make_image, variant, vision, per_image, extra):
    backend = backends[variant]
    assert tokens_per_image(vision) == per_image
    assert backend.tokens_per_image == per_image
    assert backend.processor.num_additional_image_tokens == extra
    image_id = backend.hf_model.config.image_token_index
    for n in (0, 1, 3):
        request = Request(Conversation.from_prompt("Compare.", [make_image(40 + n, 30)] * n))
        job = backend._prepare(request)
        assert int((job.input_ids == image_id).sum()) == n * per_image
        assert (job.pixel_values is None) if n == 0 else (tuple(job.pixel_values.shape) == (n, 3, 32, 32))
        # the pre-check count (before images are decoded) is the processor's count
        text_only = len(backend.processor.tokenizer(job_text(request))["input_ids"]) - n
        assert len(job.input_ids) == text_only + n * per_image


def test_real_model_values_from_the_config(backends):
    # the numbers the loader derives for the real checkpoint come from these config fields
    cfg = backends["siglip"].hf_model.config
    assert cfg.vision_config.model_type == "siglip_vision_model"
    assert cfg.vision_feature_select_strategy == "default"
    assert backends["siglip"].context_length == cfg.text_config.max_position_embeddings == 512


def job_text(request: Request) -> str:
    from mantis_llm.prompt import render

    return render(request.conversation, "local").text


def test_generation_params_are_not_required(backends, make_image):
    # no max_tokens: the default is clamped to the room the context leaves
    backend = backends["siglip"]
    job = backend._prepare(Request(Conversation.from_prompt("Hi", [make_image()]), GenerationParams()))
    assert job.max_new == min(backend.default_max_tokens, backend.context_length - len(job.input_ids))
