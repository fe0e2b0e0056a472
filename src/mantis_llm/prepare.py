"""Prepare a Mantis checkpoint for OpenAI-compatible servers (vLLM, SGLang, ``transformers serve``).

The LLaVA-architecture Mantis checkpoints load in stock transformers, but a server needs three
things the TIGER-Lab repos lack:

- a ``processor_config.json`` naming ``LlavaProcessor`` with ``patch_size``,
  ``vision_feature_select_strategy`` and ``num_additional_image_tokens`` (without it
  ``AutoProcessor`` returns only the tokenizer, and ``transformers serve`` silently drops
  every image);
- Mantis's chat template (shipped in ``mantis_llm/templates``), which writes
  ``(image j: <Image><image></Image>)`` where each image stands;
- for the Llama-3 models, ``<|eot_id|>`` among the EOS ids of ``generation_config.json``.

:func:`prepare_model` writes a new directory with those. The weights and the tokenizer files are
symlinked (never copied); the small JSON files it edits are copied. Nothing here imports torch
or transformers, and a Hub id is looked up in the local Hugging Face cache only: nothing is
downloaded. The CLI is ``mantis-llm prepare-model SRC DST [--template vicuna|llama3] [--bare]``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ._version import __version__
from .errors import ConfigurationError

__all__ = ["TEMPLATES", "TemplateName", "chat_template", "detect_template", "prepare_model"]

logger = logging.getLogger(__name__)

TemplateName = Literal["vicuna", "llama3"]
TEMPLATES: tuple[str, ...] = ("vicuna", "llama3")

MARKER = ".mantis-prepared.json"
IMAGE_TOKEN = "<image>"
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# vision tower -> (extra positions per image: CLIP's CLS token, SigLIP none; the config class's
# default image_size and patch_size, which transformers uses when config.json leaves them out)
_VISION = {"clip_vision_model": (1, 224, 32), "siglip_vision_model": (0, 224, 16)}
# files written (edited copies) rather than linked
_EDITED = ("config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
           "tokenizer_config.json")  # fmt: skip
# files never carried over: our chat_template.jinja replaces them
_DROPPED = ("chat_template.jinja", "chat_template.json")
_WEIGHTS = re.compile(r".+\.safetensors|pytorch_model.*\.bin")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def chat_template(name: TemplateName, *, bare: bool = False) -> str:
    """The text of a shipped Mantis chat template: ``"vicuna"`` (Mantis-llava-7b, bakllava) or
    ``"llama3"`` (Mantis-8B-siglip/clip-llama3). ``bare=True`` gives the variant with a plain
    ``<image>`` per image, for vLLM <= 0.24's ``MantisForConditionalGeneration``, which adds the
    image wrapper itself."""
    if name not in TEMPLATES:
        raise ConfigurationError(f"template must be one of {', '.join(TEMPLATES)}, not {name!r}")
    filename = f"mantis_{name}{'_bare' if bare else ''}.jinja"
    return resources.files("mantis_llm").joinpath("templates").joinpath(filename).read_text(encoding="utf-8")


def detect_template(src: str | os.PathLike) -> TemplateName:
    """The chat format a checkpoint was trained with, told from its tokenizer: Llama-3 header
    tokens mean ``"llama3"``, an EOS of ``</s>`` means ``"vicuna"`` (Mantis itself decides by
    the language model's name, which re-saved checkpoints do not always keep)."""
    return _detect(_read_tokenizer(_resolve_source(src)))


def prepare_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    template: TemplateName | None = None,
    bare: bool = False,
) -> Path:
    """Write a Mantis model directory that vLLM, SGLang and ``transformers serve`` load with
    images intact, and return its path.

    ``src`` is a checkpoint directory, or a Hub id whose snapshot is already in the local Hugging
    Face cache (never downloaded). ``dst`` must not exist, be empty, or be an earlier output of
    this function (which is then replaced). ``template`` overrides the chat format detected from
    the tokenizer; ``bare=True`` writes the bare-``<image>`` template and names the architecture
    ``MantisForConditionalGeneration``, for vLLM <= 0.24 only (newer vLLM refuses that name,
    which is better than serving images without their wrapper).

    Raises :class:`~mantis_llm.errors.ConfigurationError` for a missing or unusable source,
    a non-LLaVA model, a tokenizer that does not fit the template, or an occupied ``dst``.
    """
    if template is not None and template not in TEMPLATES:
        raise ConfigurationError(f"template must be one of {', '.join(TEMPLATES)} or None, not {template!r}")
    source = _resolve_source(src)
    target = Path(dst).expanduser().absolute()
    if target.exists() and target.resolve() == source.resolve():
        raise ConfigurationError(f"the destination {os.fspath(dst)!r} is the source directory itself")
    previous = _check_destination(target)

    config = _read_json(source / "config.json")
    if config is None:
        raise ConfigurationError(f"{source} has no config.json: it is not a transformers model directory")
    model_type = config.get("model_type")
    if model_type != "llava":
        raise ConfigurationError(
            f"{source} holds a {model_type!r} model, not a LLaVA one: prepare-model is for the LLaVA-architecture "
            "Mantis checkpoints (Mantis-llava-7b, Mantis-bakllava-7b, Mantis-8B-siglip-llama3, Mantis-8B-clip-llama3); "
            "Mantis-8B-Idefics2 ships its own processor and chat template and is served as it is"
        )
    if not any(_WEIGHTS.fullmatch(p.name) for p in source.iterdir()):
        raise ConfigurationError(f"{source} has no weights (*.safetensors or pytorch_model*.bin)")

    vision = _vision(config, source)
    tokenizer = _read_tokenizer(source)
    name = template or _detect(tokenizer)
    image_id = config.get("image_token_index", config.get("image_token_id"))
    if tokenizer.ids.get(IMAGE_TOKEN) is None:
        raise ConfigurationError(f"the tokenizer of {source} has no {IMAGE_TOKEN} token")
    if image_id is not None and tokenizer.ids[IMAGE_TOKEN] != image_id:
        raise ConfigurationError(
            f"{source}: config.json says the image token is id {image_id}, the tokenizer says "
            f"{IMAGE_TOKEN} is id {tokenizer.ids[IMAGE_TOKEN]}"
        )

    generation = _generation_config(_read_json(source / "generation_config.json"), config, tokenizer, name)
    files: dict[str, Any] = {  # name -> JSON to write, text to write, or the Path of a source file to link
        "config.json": _model_config(config, vision, bare),
        "generation_config.json": generation,
        "processor_config.json": _processor_config(_read_json(source / "processor_config.json"), vision),
        "chat_template.jinja": chat_template(name, bare=bare),
    }
    for json_file in ("preprocessor_config.json", "tokenizer_config.json"):
        data = _read_json(source / json_file)
        if data is not None:
            files[json_file] = _relabel(data)
    for entry in sorted(source.iterdir()):
        # top-level regular files only: dotfiles (.gitattributes, build markers) and folders
        # (chat_templates/, old checkpoints) are not part of what a server loads
        if entry.name.startswith(".") or entry.name in files or entry.name in _DROPPED or entry.name in _EDITED:
            continue
        if entry.is_file():
            files[entry.name] = Path(os.path.realpath(entry))
    files[MARKER] = {
        "prepared_by": f"mantis-llm {__version__}",
        "source": str(source),
        "template": name,
        "bare": bare,
        "files": sorted(files),
    }
    _write(target, files, previous)
    logger.info("prepared %s from %s (%s template%s)", target, source, name, ", bare" if bare else "")
    return target


# ---------------------------------------------------------------- source


def _resolve_source(src: str | os.PathLike) -> Path:
    path = Path(src).expanduser()
    if path.is_dir():
        return path.absolute()
    text = os.fspath(src)
    if path.exists():
        raise ConfigurationError(f"model source {text!r} is not a directory")
    if _HUB_ID.fullmatch(text):
        cached = _hub_snapshot(text)
        if cached is not None:
            return cached
        raise ConfigurationError(
            f"{text!r} is neither a local directory nor a model in the local Hugging Face cache "
            f"(prepare-model never downloads: fetch it first, e.g. `hf download {text}`)"
        )
    raise ConfigurationError(f"model directory {text!r} does not exist")


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id`` (HF_HUB_OFFLINE semantics: the cache only), or None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError (a FileNotFoundError), HFValidationError
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} is not a JSON object")
    return data


# ---------------------------------------------------------------- model facts


@dataclass(frozen=True)
class _Vision:
    tower: str
    patch_size: int
    strategy: str
    extra_tokens: int
    tokens_per_image: int


def _vision(config: dict[str, Any], source: Path) -> _Vision:
    vision = config.get("vision_config")
    if not vision:  # transformers' LlavaConfig then builds CLIP ViT-L/14-336, as the Mantis-llava-7b one is
        vision = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}
    tower = vision.get("model_type")
    if tower not in _VISION:
        raise ConfigurationError(f"{source}: unsupported vision tower {tower!r} (Mantis uses CLIP or SigLIP)")
    extra, default_size, default_patch = _VISION[tower]
    patch = int(vision.get("patch_size", default_patch))
    size = int(vision.get("image_size", default_size))
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigurationError(f"{source}: unknown vision_feature_select_strategy {strategy!r}")
    # "default" drops the first position: CLIP's CLS token, or (Mantis-8B-siglip) a real patch
    tokens = (size // patch) ** 2 + extra - (1 if strategy == "default" else 0)
    return _Vision(tower, patch, strategy, extra, tokens)


@dataclass(frozen=True)
class _Tokenizer:
    ids: dict[str, int]  # special/added tokens (and, when cheap, the vocabulary) -> id
    bos: str | None
    eos: str | None
    pad: str | None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_tokenizer(source: Path) -> _Tokenizer:
    """Token facts from the tokenizer files, read as JSON (no tokenizer is built)."""
    ids: dict[str, int] = {}
    data = _read_json(source / "tokenizer.json")
    if data is not None:
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids.update({k: v for k, v in vocab.items() if isinstance(v, int)})
        for token in data.get("added_tokens") or ():
            if isinstance(token, dict) and isinstance(token.get("id"), int) and isinstance(token.get("content"), str):
                ids[token["content"]] = token["id"]
    added = _read_json(source / "added_tokens.json") or {}
    ids.update({k: v for k, v in added.items() if isinstance(v, int)})
    config = _read_json(source / "tokenizer_config.json") or {}
    for key, token in (config.get("added_tokens_decoder") or {}).items():
        text = _token_text(token)
        if text is not None and str(key).isdigit():
            ids[text] = int(key)
    special = _read_json(source / "special_tokens_map.json") or {}

    def named(kind: str) -> str | None:
        return _token_text(config.get(kind)) or _token_text(special.get(kind))

    return _Tokenizer(ids=ids, bos=named("bos_token"), eos=named("eos_token"), pad=named("pad_token"))


def _detect(tokenizer: _Tokenizer) -> TemplateName:
    llama3 = all(t in tokenizer.ids for t in LLAMA3_TOKENS)
    vicuna = tokenizer.eos == "</s>"
    if llama3 and not vicuna:
        return "llama3"
    if vicuna and not llama3:
        return "vicuna"
    raise ConfigurationError(
        f"cannot tell the chat format from the tokenizer (EOS {tokenizer.eos!r}, Llama-3 header tokens "
        f"{'present' if llama3 else 'absent'}): pass template='vicuna' (Mantis-llava-7b, bakllava) or "
        "'llama3' (Mantis-8B-*-llama3), --template on the command line"
    )


def _eos_ids(tokenizer: _Tokenizer, name: TemplateName) -> list[int]:
    """The EOS ids generation must stop on."""
    if name == "vicuna":
        if "</s>" not in tokenizer.ids:
            raise ConfigurationError(
                "the vicuna template ends turns with '</s>', which this tokenizer lacks as a token"
            )
        return [tokenizer.ids["</s>"]]  # the turn separator is Vicuna's EOS
    missing = [t for t in LLAMA3_TOKENS if t not in tokenizer.ids]
    if missing:
        raise ConfigurationError(
            f"the llama3 template needs the tokens {', '.join(missing)}, which this tokenizer lacks"
        )
    # Mantis stops on the tokenizer's EOS and on <|eot_id|> (chat_mllava: eos_token_id=[eos, eot]),
    # 128001 and 128009 for Llama-3; the configs list only the first
    ids: list[int] = []
    for token in (tokenizer.eos, "<|end_of_text|>", "<|eot_id|>"):
        if token in tokenizer.ids and tokenizer.ids[token] not in ids:
            ids.append(tokenizer.ids[token])
    return ids


# ---------------------------------------------------------------- edited files


def _model_config(config: dict[str, Any], vision: _Vision, bare: bool) -> dict[str, Any]:
    out = dict(config)
    # informational for transformers, but vLLM and other tools read it; the 4.39-era repos
    # leave it out (transformers then assumes 576, wrong for SigLIP's 728)
    out["image_seq_length"] = vision.tokens_per_image
    if bare:
        out["architectures"] = ["MantisForConditionalGeneration"]
    return out


def _generation_config(
    generation: dict[str, Any] | None, config: dict[str, Any], tokenizer: _Tokenizer, name: TemplateName
) -> dict[str, Any]:
    out = dict(generation or {})
    eos = _eos_ids(tokenizer, name)
    old = out.get("eos_token_id")
    for extra in old if isinstance(old, list) else [old]:
        if isinstance(extra, int) and extra not in eos:
            eos.append(extra)
    out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if out.get("bos_token_id") is None and tokenizer.bos in tokenizer.ids:
        out["bos_token_id"] = tokenizer.ids[tokenizer.bos]
    if out.get("pad_token_id") is None:
        text_config = config.get("text_config") or {}
        pad = tokenizer.ids.get(tokenizer.pad) if tokenizer.pad else None
        for value in (pad, config.get("pad_token_id"), text_config.get("pad_token_id")):
            if isinstance(value, int):
                out["pad_token_id"] = value
                break
    # a generation config marked as derived from the model config may be rebuilt from it by
    # transformers' generate(), which would drop the EOS ids set here
    out.pop("_from_model_config", None)
    return out


def _processor_config(processor: dict[str, Any] | None, vision: _Vision) -> dict[str, Any]:
    out = dict(processor or {})
    out.pop("chat_template", None)  # it would take precedence over chat_template.jinja
    out.update(
        processor_class="LlavaProcessor",
        image_token=IMAGE_TOKEN,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=vision.strategy,
        num_additional_image_tokens=vision.extra_tokens,
    )
    return out


def _relabel(data: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer/preprocessor config that names ``LlavaProcessor`` (the repos say
    ``MLlavaProcessor``, which transformers does not know) and carries no chat template (a
    Llama-3-Instruct one in the 8B repos, which knows nothing of images)."""
    out = dict(data)
    out.pop("chat_template", None)
    if "processor_class" in out or "image_processor_type" in out:
        out["processor_class"] = "LlavaProcessor"
    return out


# ---------------------------------------------------------------- destination


def _check_destination(target: Path) -> list[str]:
    """The files of an earlier prepare output in ``target`` (to replace), or [] if it is free."""
    if not target.exists():
        return []
    if not target.is_dir():
        raise ConfigurationError(f"the destination {target} exists and is not a directory")
    names = {p.name for p in target.iterdir()}
    if not names:
        return []
    marker = _read_json(target / MARKER) if MARKER in names else None
    listed = marker.get("files") if marker else None
    if not isinstance(listed, list):
        raise ConfigurationError(
            f"the destination {target} is not empty and was not written by prepare-model: "
            "choose a new directory (weights are linked, so it costs no space)"
        )
    unknown = sorted(names - set(listed) - {MARKER})
    if unknown:
        raise ConfigurationError(
            f"the destination {target} is an earlier prepare-model output, but also holds files prepare-model "
            f"did not write ({', '.join(unknown)}): remove them or choose a new directory"
        )
    return [n for n in listed if isinstance(n, str) and "/" not in n and n not in (".", "..")]


def _link(source: Path, link: Path) -> None:
    try:
        os.symlink(source, link)
    except OSError:  # no symlinks here (e.g. Windows without the privilege): a hard link costs no space either
        try:
            os.link(source, link)
        except OSError as exc:
            raise ConfigurationError(f"cannot link {source} into {link.parent}: {exc}") from None


def _write(target: Path, files: dict[str, Any], previous: list[str]) -> None:
    """Build the directory beside ``target``, then move it into place, so a failure never leaves a
    half-written model where a server would load it."""
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        for name, content in files.items():
            if isinstance(content, Path):
                _link(content, staging / name)
            elif isinstance(content, str):
                (staging / name).write_text(content, encoding="utf-8")
            else:
                (staging / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if target.exists():
            for name in [*previous, MARKER]:
                (target / name).unlink(missing_ok=True)
            target.rmdir()
        staging.rename(target)
    except OSError as exc:
        raise ConfigurationError(f"cannot write the model directory {target}: {exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
