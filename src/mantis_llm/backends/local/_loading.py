"""Loading a LLaVA-architecture Mantis checkpoint with stock transformers.

``LlavaForConditionalGeneration`` and a ``LlavaProcessor`` configured from the model's own
config: never ``AutoProcessor`` (on the TIGER-Lab repos it silently returns only the
tokenizer), never the ``mantis-vl`` package (it does not import with transformers 5).
torch and transformers are imported here, on first use, never when ``mantis_llm`` is.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigurationError
from ._deps import import_deps

logger = logging.getLogger("mantis_llm.local")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@dataclass
class Loaded:
    """Everything the worker needs once the model is in memory."""

    torch: Any
    model: Any
    processor: Any
    tokenizer: Any
    device: Any
    pad_id: int
    eos_ids: frozenset[int]
    tokens_per_image: int
    wrapper_tokens: int  # text tokens of "(image j: <Image>...</Image>) " around each image
    context: int
    stopping_list: Any  # transformers.StoppingCriteriaList
    logits_list: Any  # transformers.LogitsProcessorList
    grammar: Any  # a grammar.GrammarCompiler for this tokenizer (llguidance loads on first use)


@dataclass(frozen=True)
class LoadSettings:
    """The constructor options that decide how the model is loaded."""

    model: str
    device: str | None = None
    device_map: str | dict[str, Any] | None = None
    dtype: Any = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    max_context: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def check_model_path(model: str) -> None:
    """A path that looks local must exist: say so in one line, before torch is imported."""
    looks_local = os.path.isabs(model) or model.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise ConfigurationError(f"local model directory {model!r} does not exist")


def load(s: LoadSettings) -> Loaded:
    """Load config, processor and weights of ``s.model``; every failure is a ConfigurationError."""
    check_model_path(s.model)
    torch, tf = import_deps()
    common: dict[str, Any] = {"trust_remote_code": s.trust_remote_code}
    if s.revision is not None:
        common["revision"] = s.revision

    def failed(what: str, exc: BaseException) -> ConfigurationError:
        hint = ""
        if not os.path.isdir(s.model):
            hint = (
                " (it is not a local directory; as a Hub id its files must be cached or the Hub"
                " reachable with HF_HUB_OFFLINE unset)"
            )
        return ConfigurationError(
            f"cannot load the {what} of local model {s.model!r}{hint}: {first_line(exc)}", detail=str(exc)
        )

    try:
        config = tf.AutoConfig.from_pretrained(s.model, **common)
    except Exception as exc:  # OSError (not found/offline), ValueError (bad config), ...
        raise failed("config", exc) from None
    if config.model_type != "llava":
        raise ConfigurationError(
            f"{s.model!r} is a {config.model_type!r} model; the local backend runs LLaVA-architecture "
            "Mantis checkpoints such as TIGER-Lab/Mantis-llava-7b or TIGER-Lab/Mantis-8B-siglip-llama3"
        )
    vision = config.vision_config
    try:
        processor = tf.LlavaProcessor.from_pretrained(
            s.model,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            # CLIP has a CLS position (dropped again by the "default" strategy); SigLIP has none
            num_additional_image_tokens=1 if vision.model_type.startswith("clip") else 0,
            **common,
        )
    except Exception as exc:
        raise failed("processor", exc) from None
    tokenizer = processor.tokenizer

    cuda = torch.cuda.is_available()
    device = s.device or ("cuda" if cuda else "cpu")
    dtype = torch_dtype(torch, s.dtype, str(device).startswith("cuda") if s.device_map is None else cuda)
    kwargs: dict[str, Any] = dict(s.model_kwargs, dtype=dtype, **common)
    if s.attn_implementation is not None:
        kwargs["attn_implementation"] = s.attn_implementation
    move_to = None
    if s.device_map is not None:
        kwargs["device_map"] = s.device_map
    elif device != "cpu":
        if importlib.util.find_spec("accelerate") is not None:
            kwargs["device_map"] = {"": device}
        else:
            move_to = device
    try:
        model = tf.LlavaForConditionalGeneration.from_pretrained(s.model, config=config, **kwargs)
        if move_to is not None:
            model = model.to(move_to)
    except Exception as exc:
        raise failed("weights", exc) from None
    model.eval()

    gen = model.generation_config
    eos: set[int] = set()
    for value in (gen.eos_token_id, tokenizer.eos_token_id):
        if value is not None:
            eos.update(value if isinstance(value, (list, tuple)) else [value])
    pad_id = next(
        (v for v in (tokenizer.pad_token_id, gen.pad_token_id, getattr(config, "pad_token_id", None)) if v is not None),
        min(eos) if eos else 0,
    )
    if isinstance(pad_id, (list, tuple)):
        pad_id = pad_id[0]
    # count how many positions one image really takes, through the real processor
    from PIL import Image as PILImage

    probe = processor(text=[processor.image_token], images=[PILImage.new("RGB", (64, 64))], return_tensors="pt")
    tokens_per_image = int((probe["input_ids"][0] == config.image_token_index).sum())
    wrapper = f"(image 1: <Image>{processor.image_token}</Image>) "
    wrapper_tokens = len(tokenizer(wrapper, add_special_tokens=False)["input_ids"]) - 1
    context = s.max_context or int(getattr(config.text_config, "max_position_embeddings", 4096))
    from .grammar import GrammarCompiler  # no llguidance import until a grammar is compiled

    logger.info(
        "loaded %s on %s (%s, %d tokens per image, context %d)",
        s.model,
        model.device,
        model.dtype,
        tokens_per_image,
        context,
    )
    return Loaded(
        torch=torch,
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        device=model.device,
        pad_id=int(pad_id),
        eos_ids=frozenset(int(e) for e in eos),
        tokens_per_image=tokens_per_image,
        wrapper_tokens=wrapper_tokens,
        context=context,
        stopping_list=tf.StoppingCriteriaList,
        logits_list=tf.LogitsProcessorList,
        grammar=GrammarCompiler(tokenizer, n_vocab=int(model.get_output_embeddings().weight.shape[0]), eos_ids=eos),
    )


def torch_dtype(torch: Any, dtype: Any, on_cuda: bool) -> Any:
    """The torch dtype for the ``dtype`` option: bf16 (fp16 without bf16) on CUDA, fp32 on CPU."""
    if dtype is None:
        if on_cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ConfigurationError(f"unknown dtype {dtype!r}: use e.g. 'bfloat16', 'float16' or 'float32'")
    return value
