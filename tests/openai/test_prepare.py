"""``prepare_model`` / ``mantis-llm prepare-model``: the directory servers load.

The tiny models cover both real layouts (save_pretrained, and the raw TIGER-Lab repo with no
processor config). The Llama-3 and error cases use small hand-written checkpoints: prepare_model
reads JSON only, so config and tokenizer files (and an empty weights file) are all it needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mantis_llm.cli import main
from mantis_llm.errors import ConfigurationError
from mantis_llm.prepare import MARKER, chat_template, detect_template, prepare_model


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def llama3_checkpoint(root: Path, *, vision: str = "siglip_vision_model") -> Path:
    """A JSON-only stand-in for TIGER-Lab/Mantis-8B-siglip-llama3 (ids as in the real tokenizer)."""
    root.mkdir(parents=True)
    write_json(
        root / "config.json",
        {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": 128256,
            "vision_feature_select_strategy": "default",
            "vision_config": {"model_type": vision, "image_size": 384, "patch_size": 14},
            "text_config": {"model_type": "llama", "_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct"},
        },
    )
    special = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eot_id|>": 128009,
        "<image>": 128256,
        "<pad>": 128257,
    }
    write_json(root / "tokenizer.json", {"added_tokens": [{"id": i, "content": t} for t, i in special.items()]})
    write_json(
        root / "tokenizer_config.json",
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "pad_token": "<pad>",
            "chat_template": "{{ 'Llama-3-Instruct template, no images' }}",
            "processor_class": "MLlavaProcessor",
        },
    )
    write_json(root / "preprocessor_config.json", {"image_processor_type": "SiglipImageProcessor"})
    write_json(root / "generation_config.json", {"bos_token_id": 128000, "eos_token_id": 128001})
    (root / "model-00001-of-00001.safetensors").write_bytes(b"")
    (root / "README.md").write_text("model card")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs")
    (root / "chat_templates").mkdir()
    return root


# ---------------------------------------------------------------- the tiny models


@pytest.mark.parametrize("layout", ["hf", "mantis"])
def test_prepared_tiny_model(prepared, tiny_sources, layout):
    src, dst = tiny_sources[layout], prepared[layout]
    names = sorted(os.listdir(dst))
    edited = ["config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json"]
    if layout == "mantis":
        edited.append("preprocessor_config.json")
    assert names == sorted([MARKER, "chat_template.jinja", "model.safetensors", "tokenizer.json", *edited])
    # weights and tokenizer linked to the source files, not copied; the edited JSON files are real files
    for linked in ("model.safetensors", "tokenizer.json"):
        assert (dst / linked).is_symlink()
        assert os.path.realpath(dst / linked) == os.path.realpath(src / linked)
    for name in edited:
        assert not (dst / name).is_symlink()
    assert (dst / "chat_template.jinja").read_text() == chat_template("vicuna")

    processor = read(dst / "processor_config.json")
    assert processor["processor_class"] == "LlavaProcessor"
    assert (processor["patch_size"], processor["num_additional_image_tokens"]) == (8, 1)
    assert processor["vision_feature_select_strategy"] == "default"
    assert "chat_template" not in processor
    if layout == "hf":  # the embedded image processor settings survive
        assert processor["image_processor"]["crop_size"] == {"height": 32, "width": 32}
    else:
        assert read(dst / "preprocessor_config.json")["processor_class"] == "LlavaProcessor"

    config = read(dst / "config.json")
    assert config["image_seq_length"] == 16
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    generation = read(dst / "generation_config.json")
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 259)
    assert "_from_model_config" not in generation
    marker = read(dst / MARKER)
    assert marker["template"] == "vicuna" and marker["bare"] is False and marker["source"] == str(src)


@pytest.mark.parametrize("layout", ["hf", "mantis"])
def test_servers_load_the_processor_with_the_template(prepared, layout):
    from transformers import AutoProcessor, LlavaProcessor

    # on the raw-repo layout AutoProcessor returns only the tokenizer, which drops every image
    processor = AutoProcessor.from_pretrained(prepared[layout])
    assert isinstance(processor, LlavaProcessor)
    assert processor.patch_size == 8 and processor.num_additional_image_tokens == 1
    assert processor.chat_template == chat_template("vicuna")
    assert processor.tokenizer.chat_template == chat_template("vicuna")


def test_siglip_and_bare(openai_root):
    from mantis_llm.testing import build_tiny_mantis

    src = build_tiny_mantis(openai_root / "tiny-siglip", vision="siglip")
    dst = prepare_model(src, openai_root / "prepared-siglip-bare", bare=True)
    processor = read(dst / "processor_config.json")
    assert processor["num_additional_image_tokens"] == 0  # SigLIP has no CLS position
    assert read(dst / "config.json")["image_seq_length"] == 15
    # vLLM <= 0.24 then picks its Mantis class without --hf-overrides; newer vLLM refuses the name
    assert read(dst / "config.json")["architectures"] == ["MantisForConditionalGeneration"]
    assert (dst / "chat_template.jinja").read_text() == chat_template("vicuna", bare=True)


# ---------------------------------------------------------------- Llama-3 (hand-written checkpoint)


def test_llama3_checkpoint(tmp_path):
    src = llama3_checkpoint(tmp_path / "src")
    assert detect_template(src) == "llama3"
    dst = prepare_model(src, tmp_path / "dst")
    assert (dst / "chat_template.jinja").read_text() == chat_template("llama3")
    assert read(dst / "generation_config.json")["eos_token_id"] == [128001, 128009]
    assert read(dst / "generation_config.json")["pad_token_id"] == 128257
    tokenizer_config = read(dst / "tokenizer_config.json")
    assert "chat_template" not in tokenizer_config  # the Llama-3-Instruct one must not win anywhere
    assert tokenizer_config["processor_class"] == "LlavaProcessor"
    processor = read(dst / "processor_config.json")
    assert (processor["patch_size"], processor["num_additional_image_tokens"]) == (14, 0)
    assert read(dst / "config.json")["image_seq_length"] == 728  # 27 * 27 - 1 ("default" drops one)
    # dotfiles, folders and chat_template files are left behind; other files are linked
    assert sorted(os.listdir(dst)) == sorted(
        [MARKER, "README.md", "chat_template.jinja", "config.json", "generation_config.json",
         "model-00001-of-00001.safetensors", "preprocessor_config.json", "processor_config.json",
         "tokenizer.json", "tokenizer_config.json"]
    )  # fmt: skip


def test_clip_llama3_and_template_override(tmp_path):
    src = llama3_checkpoint(tmp_path / "src", vision="clip_vision_model")
    clip = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}
    write_json(src / "config.json", {**read(src / "config.json"), "vision_config": clip})
    dst = prepare_model(src, tmp_path / "dst")
    assert read(dst / "config.json")["image_seq_length"] == 576
    assert read(dst / "processor_config.json")["num_additional_image_tokens"] == 1
    # an override wins over detection, but the tokenizer must fit it
    with pytest.raises(ConfigurationError, match="vicuna template ends turns with '</s>'"):
        prepare_model(src, tmp_path / "other", template="vicuna")


# ---------------------------------------------------------------- errors


def test_missing_and_unusable_sources(tmp_path, tiny_mantis):
    with pytest.raises(ConfigurationError, match="does not exist"):
        prepare_model(tmp_path / "nope", tmp_path / "dst")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="is not a directory"):
        prepare_model(tmp_path / "file", tmp_path / "dst")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="has no config.json"):
        prepare_model(tmp_path / "empty", tmp_path / "dst")
    with pytest.raises(ConfigurationError, match="template must be one of"):
        prepare_model(tiny_mantis, tmp_path / "dst", template="mistral")  # type: ignore[arg-type]
    assert not (tmp_path / "dst").exists()


def test_non_llava_model(tmp_path):
    src = tmp_path / "idefics2"
    src.mkdir()
    write_json(src / "config.json", {"model_type": "idefics2"})
    with pytest.raises(ConfigurationError, match="'idefics2' model, not a LLaVA one"):
        prepare_model(src, tmp_path / "dst")


def test_no_weights_and_image_token_mismatch(tmp_path):
    src = llama3_checkpoint(tmp_path / "src")
    (src / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(ConfigurationError, match="has no weights"):
        prepare_model(src, tmp_path / "dst")
    (src / "model.safetensors").write_bytes(b"")
    write_json(src / "config.json", {**read(src / "config.json"), "image_token_index": 32000})
    with pytest.raises(ConfigurationError, match="image token is id 32000"):
        prepare_model(src, tmp_path / "dst")


def test_undetectable_template(tmp_path):
    src = llama3_checkpoint(tmp_path / "src")
    write_json(src / "tokenizer.json", {"added_tokens": [{"id": 128256, "content": "<image>"}]})
    write_json(src / "tokenizer_config.json", {"eos_token": "<eos>"})
    with pytest.raises(ConfigurationError, match="cannot tell the chat format.*--template"):
        prepare_model(src, tmp_path / "dst")
    with pytest.raises(ConfigurationError, match="llama3 template needs the tokens"):
        prepare_model(src, tmp_path / "dst", template="llama3")


def test_destination_rules(tmp_path, tiny_mantis):
    dst = tmp_path / "dst"
    dst.mkdir()
    prepare_model(tiny_mantis, dst)  # an empty directory is fine
    first = read(dst / MARKER)
    again = prepare_model(tiny_mantis, dst, bare=True)  # an earlier output is replaced
    assert again == dst and read(dst / MARKER)["bare"] is True and first["bare"] is False
    assert (dst / "chat_template.jinja").read_text() == chat_template("vicuna", bare=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.tmp")]  # no staging left behind

    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match=r"also holds files prepare-model did not write \(notes.txt\)"):
        prepare_model(tiny_mantis, dst)
    assert (dst / "notes.txt").exists() and (dst / "model.safetensors").exists()  # nothing touched

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_text("someone else's")
    with pytest.raises(ConfigurationError, match="not empty and was not written by prepare-model"):
        prepare_model(tiny_mantis, foreign)
    with pytest.raises(ConfigurationError, match="is the source directory itself"):
        prepare_model(tiny_mantis, tiny_mantis)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigurationError, match="exists and is not a directory"):
        prepare_model(tiny_mantis, tmp_path / "a-file")


# ---------------------------------------------------------------- Hub ids: the local cache only


def fake_hub_cache(cache: Path, repo_id: str, files_from: Path) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files_from.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (snapshot / f.name).symlink_to(f)  # the real cache links snapshots to blobs


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch, tiny_mantis):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    fake_hub_cache(cache, "TIGER-Lab/Mantis-tiny", tiny_mantis)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    dst = prepare_model("TIGER-Lab/Mantis-tiny", tmp_path / "dst")
    # links point at the real files, not at the cache's own symlinks
    assert os.readlink(dst / "model.safetensors") == os.path.realpath(tiny_mantis / "model.safetensors")
    with pytest.raises(ConfigurationError, match="never downloads: fetch it first, e.g. `hf download TIGER-Lab/x`"):
        prepare_model("TIGER-Lab/x", tmp_path / "dst2")


# ---------------------------------------------------------------- the CLI


def test_cli_prepare_model(capsys, tmp_path, tiny_mantis):
    dst = tmp_path / "served"
    assert main(["prepare-model", str(tiny_mantis), str(dst), "--bare"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{dst}\n" and err == ""
    assert read(dst / MARKER)["bare"] is True

    assert main(["prepare-model", str(tiny_mantis), str(tmp_path / "x"), "--template", "llama3"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: the llama3 template needs the tokens") and err.count("\n") == 1

    assert main(["prepare-model", str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err == f"error: model directory '{tmp_path / 'missing'}' does not exist\n"

    assert main(["prepare-model", str(tiny_mantis)]) == 2  # usage error (argparse)
    assert main(["prepare-model", "--help"]) == 0
    assert "--template {vicuna,llama3}" in capsys.readouterr().out
