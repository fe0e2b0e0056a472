"""Tiny random-weight Mantis stand-ins, for tests, notebooks and benchmarks.

:func:`build_tiny_mantis` writes a LLaVA checkpoint of the real Mantis architecture (a CLIP
or SigLIP vision tower, a projector, a Llama language model) with a byte-level tokenizer that
knows ``<image>``, ``<s>``, ``</s>`` and ``<pad>``. Weights are random, so the "answers" are
random printable characters that depend on the prompt and the images; EOS is rare, so ask for
few tokens. Every code path (config, processor, image-token expansion, generation) is the
real one. Nothing is downloaded. torch and transformers are imported only when called.

    from mantis_llm.testing import build_tiny_mantis
    path = build_tiny_mantis("/tmp/tiny-mantis")             # HF layout, CLIP 32px / patch 8
    TransformersBackend(model=str(path))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

__all__ = ["build_tiny_mantis", "tokens_per_image"]

_MARKER = ".tiny_mantis.json"
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tokens_per_image(vision: str = "clip", image_size: int = 32, patch_size: int = 8) -> int:
    """Image tokens one image expands to: CLIP keeps its CLS slot, SigLIP has none, and the
    "default" feature strategy drops the first position (16 for CLIP 32/8, 15 for SigLIP)."""
    return (image_size // patch_size) ** 2 + (1 if vision == "clip" else 0) - 1


def build_tiny_mantis(
    path: str | Path,
    vision: Literal["clip", "siglip"] = "clip",
    layout: Literal["hf", "mantis"] = "hf",
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    max_position_embeddings: int = 512,
) -> Path:
    """Build a random-weight Mantis-architecture LLaVA in ``path`` and return the path.

    ``layout="hf"`` saves with ``save_pretrained`` (model and ``LlavaProcessor``).
    ``layout="mantis"`` writes the directory like the real ``TIGER-Lab/Mantis-llava-7b`` repo:
    a transformers-4.39-style ``config.json`` (top-level ``vocab_size``/``ignore_index``/
    ``pad_token_id``, a minimal ``text_config``, no ``image_seq_length``), a
    ``preprocessor_config.json`` whose ``processor_class`` is ``MLlavaProcessor``, no
    ``processor_config.json`` (so ``AutoProcessor`` returns only the tokenizer), and weights under
    the legacy names (``language_model.model.*``, ``vision_tower.vision_model.*``).

    Building is deterministic in ``seed`` and cached: if ``path`` already holds a model built
    with the same arguments it is returned untouched.
    """
    if vision not in ("clip", "siglip"):
        raise ValueError(f"vision must be 'clip' or 'siglip', not {vision!r}")
    if layout not in ("hf", "mantis"):
        raise ValueError(f"layout must be 'hf' or 'mantis', not {layout!r}")
    path = Path(path)
    spec = dict(
        vision=vision, layout=layout, seed=seed, image_size=image_size, patch_size=patch_size,
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        vision_hidden_size=vision_hidden_size, vision_layers=vision_layers,
        max_position_embeddings=max_position_embeddings,
    )  # fmt: skip
    marker = path / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == spec:
                return path
        except ValueError:
            pass
        marker.unlink()  # a half-rebuilt directory must not pass for the old model
    path.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = _byte_level_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vcfg: Any
    if vision == "clip":
        from transformers import CLIPVisionConfig

        CLIPImageProcessor = _image_processor_class("CLIP")
        vcfg = CLIPVisionConfig(
            image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size, num_hidden_layers=vision_layers,
            num_attention_heads=4, projection_dim=vision_hidden_size,
        )  # fmt: skip
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
        )  # fmt: skip
    else:
        from transformers import SiglipVisionConfig

        SiglipImageProcessor = _image_processor_class("Siglip")
        vcfg = SiglipVisionConfig(
            image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size, num_hidden_layers=vision_layers,
            num_attention_heads=4, hidden_act="gelu_pytorch_tanh",
        )  # fmt: skip
        image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    tcfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    n_tokens = tokens_per_image(vision, image_size, patch_size)
    cfg = LlavaConfig(
        vision_config=vcfg, text_config=tcfg, image_token_index=image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=n_tokens,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            # larger weights than the default init, so greedy answers depend on the prompt
            # and the images (tests compare answers across requests)
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.15)
            # shrink the output rows of everything but printable ASCII: answers read as
            # random printable text, and EOS is rare (use small max_tokens)
            printable = {tokenizer.encode(chr(c), add_special_tokens=False)[0] for c in range(0x20, 0x7F)}
            head = model.get_output_embeddings().weight
            for i in range(head.shape[0]):
                if i not in printable:
                    head[i] *= 0.25
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        _save(path, layout, model, cfg, tokenizer, image_processor, vision, patch_size)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    marker.write_text(json.dumps(spec))
    return path


def _save(path: Path, layout: str, model, cfg, tokenizer, image_processor, vision: str, patch_size: int) -> None:
    from transformers import LlavaProcessor

    if layout == "hf":
        model.save_pretrained(path)
        LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1 if vision == "clip" else 0,
        ).save_pretrained(path)  # fmt: skip
    else:
        _save_mantis_layout(path, model, cfg, tokenizer, image_processor)


def _image_processor_class(prefix: str):
    """The PIL image processor (what the original checkpoints used; needs no torchvision)."""
    import transformers

    try:
        return getattr(transformers, f"{prefix}ImageProcessorPil")
    except AttributeError:  # older transformers: the plain class is the PIL one
        return getattr(transformers, f"{prefix}ImageProcessor")


def _byte_level_tokenizer():
    """A byte-level BPE with no merges: 256 byte tokens plus the Llama/Mantis specials.

    Like the Llama tokenizer it prepends ``<s>``, and ``</s>`` in text is the EOS token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=1_000_000,
    )  # fmt: skip
    hf.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return hf


def _save_mantis_layout(path: Path, model, cfg, tokenizer, image_processor) -> None:
    """Write the checkpoint the way the 2024 TIGER-Lab repos look (transformers 4.39)."""
    from safetensors.torch import save_file

    vision_type = cfg.vision_config.model_type
    vision_keys = ("hidden_size", "image_size", "intermediate_size", "num_attention_heads",
                   "num_hidden_layers", "patch_size")  # fmt: skip
    vision = {k: getattr(cfg.vision_config, k) for k in vision_keys}
    vision["model_type"] = vision_type
    if vision_type == "clip_vision_model":
        vision.update(projection_dim=cfg.vision_config.projection_dim, vocab_size=32000)
    else:
        vision["hidden_act"] = cfg.vision_config.hidden_act
    t = cfg.text_config
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": cfg.image_token_index,
        "model_type": "llava",
        "pad_token_id": tokenizer.pad_token_id,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "model_type": "llama",
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": t.vocab_size,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.39.2",
        "vision_config": vision,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": t.vocab_size,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(path)

    # legacy (4.39) weight names; transformers 5 renames them on load
    legacy = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.language_model."):
            new = "language_model.model." + name[len("model.language_model.") :]
        elif name.startswith("lm_head."):
            new = "language_model." + name
        elif name.startswith("model.vision_tower."):
            rest = name[len("model.vision_tower.") :]
            new = "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
        elif name.startswith("model.multi_modal_projector."):
            new = name[len("model.") :]
        else:  # pragma: no cover - a new transformers naming we do not know
            raise RuntimeError(f"unexpected LLaVA weight name {name!r}")
        legacy[new] = tensor.detach().contiguous().clone()
    save_file(legacy, str(path / "model.safetensors"), metadata={"format": "pt"})

    tokenizer.save_pretrained(path)
    pre = image_processor.to_dict()
    pre.pop("processor_class", None)
    pre["image_processor_type"] = "CLIPImageProcessor" if vision_type.startswith("clip") else "SiglipImageProcessor"
    pre["processor_class"] = "MLlavaProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    for stray in ("processor_config.json", "chat_template.jinja", "chat_template.json"):
        (path / stray).unlink(missing_ok=True)
