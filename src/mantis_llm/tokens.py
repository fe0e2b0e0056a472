"""Count tokens the way Mantis sees them: offline, never touching the network, in microseconds.

A conversation costs what the model receives: the prompt :func:`~mantis_llm.prompt.render`
writes in ``"local"`` mode (template, system prompt, roles, image wrappers, plus BOS) and
``tokens_per_image`` positions for each image (576 for Mantis-llava-7b's CLIP ViT-L/14-336,
24 x 24 patches; 728 for Mantis-8B-siglip-llama3, see :func:`model_info`). Text is counted
from the best source at hand:

1. the model's own tokenizer object (``TokenCounter(tokenizer)``, or
   :meth:`TokenCounter.from_backend` on a loaded local backend): exact;
2. a model directory, or a Hub id already in the local Hugging Face cache, holding
   ``tokenizer.json`` (:meth:`TokenCounter.from_pretrained`): read with ``tokenizers``, the
   pipeline set up as transformers 5 sets it up (exact there); nothing is downloaded;
3. otherwise an estimate from the text (:func:`estimate_tokens`).

The estimate adds up costs per piece of text, read off real tokenizations by attributing
every token to the characters it covers: a word costs by its length (1 token up to 6 letters,
about 2 at 12; ALL-CAPS words about twice that), a digit 1 (Llama-3: up to 3 digits a token),
an ASCII punctuation mark 0.7 (a run of one mark, such as a rule of dashes, far less), a
newline 1, a run of spaces 1 (a single space nothing: it belongs to the next word), other
scripts a cost per character (Cyrillic 0.4, Han 1.3, Hangul 2, an emoji 4 byte tokens for
Llama-2), and the default system prompt its exact 30. Text whose letters are at least 1 %
accented Latin is taken for a language other than English, whose words cost about 1.5 times
as much. The figures were fitted and checked on the real Llama-2 tokenizer (Vicuna-7B-v1.5's,
hence Mantis-llava-7b's; 32,000 SentencePiece pieces) and the Llama-3 one, over 1,200-character
chunks of English prose (3.8 characters a token for Llama-2), Markdown notes (2.9), Python
source (3.3), JSON (2.9) and UI strings in 21 languages. Mean error per kind of English text:
prose +5 %, Markdown -5 %, code and JSON -1 % (Llama-3: within 5 %); 90 % of chunks within
-16 %..+12 %. Rendered Mantis prompts: -2 %..+3 % on average, median 2-4 tokens off. Most other
languages are within 15 %; Dutch, Turkish and Vietnamese are underestimated by 15-30 %, and
random strings (base64) by half. A single ratio does worse: 4 characters a token (the usual
figure for Llama on English) undercounts Markdown and JSON by 22-27 %, 3.5 overcounts prose by
11 % and still undercounts Markdown by 16 %. Leave a margin when a limit is hard.

Nothing here imports ``tokenizers``, ``transformers`` or ``huggingface_hub`` until a
tokenizer file is read, and no function downloads anything.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigurationError, InvalidRequestError
from .prompt import DEFAULT_SYSTEM, IMAGE_TOKEN, SEP, RenderedPrompt, render
from .types import Conversation, Request, Turn

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "DEFAULT_TOKENS_PER_IMAGE",
    "Family",
    "ModelInfo",
    "TokenCounter",
    "estimate_tokens",
    "model_info",
]

Family = Literal["vicuna", "llama3"]
DEFAULT_TOKENS_PER_IMAGE = 576  # CLIP ViT-L/14 at 336 px: (336 // 14) ** 2
DEFAULT_CONTEXT_LENGTH = 4096  # Vicuna-7B-v1.5 (Llama-2)


# ---------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class ModelInfo:
    """What a model name tells: its tokenizer ``family`` (for the estimate), prompt tokens
    per image and context length."""

    family: Family
    tokens_per_image: int
    context_length: int


def model_info(model: str | os.PathLike | None = None) -> ModelInfo:
    """The facts of a Mantis checkpoint or fal endpoint, from its name alone (no I/O).

    Mantis-llava-7b (and fal's ``mantis-llava-7b-v11``, and anything unrecognised):
    Vicuna, 576, 4,096. Mantis-bakllava-7b: a Mistral SentencePiece vocabulary (counted as
    Vicuna), 576, 8,192. Mantis-8B-siglip-llama3: Llama-3, 728 (SigLIP 384/14 = 27 x 27, less
    the first patch the "default" strategy drops), 8,192. Mantis-8B-clip-llama3: Llama-3, 576,
    8,192.
    """
    name = os.fspath(model).lower() if model is not None else ""
    if "llama3" in name or "llama-3" in name:
        return ModelInfo("llama3", 728 if "siglip" in name else DEFAULT_TOKENS_PER_IMAGE, 8192)
    if "bakllava" in name:
        return ModelInfo("vicuna", DEFAULT_TOKENS_PER_IMAGE, 8192)
    return ModelInfo("vicuna", DEFAULT_TOKENS_PER_IMAGE, DEFAULT_CONTEXT_LENGTH)


# ---------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class _Profile:
    words: tuple[float, ...]  # cost of an English word of 1..12 letters
    words_other: tuple[float, ...]  # the same in another Latin-script language
    caps: tuple[float, ...]  # an ALL-CAPS word of 1..12 letters
    per_letter: float  # each letter past 12
    punct: float
    punct_run: float  # per character of a run of 3 or more of one mark ("-----", "===")
    digits_per_token: int
    newline: float  # per newline (Llama-2) or per run of newlines (Llama-3)
    newline_runs: bool
    spaces_per_token: int  # in a run of 2 or more spaces
    tab_runs: bool  # a run of tabs is one token (Llama-3), else one per tab
    scripts: tuple[float, ...]  # per character, by _SCRIPT_STARTS range
    latin_additional: float  # extra per U+1E00-1EFF letter (Vietnamese): Llama-2 spells them in bytes
    separator: int  # "</s>": one special token for Vicuna, plain text for Llama-3
    default_system: int  # the exact tokens of prompt.DEFAULT_SYSTEM, in most prompts


# Start code points of the scripts priced per character (accented Latin belongs to words):
# other, Greek, Cyrillic, other, Hebrew, Arabic, other, Indic, Thai, other, CJK symbols and kana,
# Han, other, Hangul, other, outside the BMP (emoji)
_SCRIPT_STARTS = (0x80, 0x0370, 0x0400, 0x0530, 0x0590, 0x0600, 0x0700, 0x0900, 0x0E00, 0x0E80, 0x2E80, 0x3400,
                  0xA000, 0xAC00, 0xD7B0, 0x10000)  # fmt: skip

_PROFILES: dict[str, _Profile] = {
    "vicuna": _Profile(
        words=(1.0, 1.0, 1.1, 1.1, 1.15, 1.25, 1.35, 1.45, 1.7, 1.8, 1.9, 2.1),
        words_other=(1.0, 1.05, 1.3, 1.55, 2.0, 2.2, 2.5, 2.75, 3.05, 3.2, 3.55, 3.9),
        caps=(1.0, 1.1, 1.7, 1.6, 2.5, 2.9, 2.9, 3.8, 4.4, 4.4, 4.75, 6.2),
        per_letter=0.3,
        punct=0.73,
        punct_run=0.1,
        digits_per_token=1,
        newline=1.0,
        newline_runs=False,
        spaces_per_token=16,
        tab_runs=False,
        latin_additional=2.0,
        scripts=(1.0, 1.11, 0.41, 1.0, 1.0, 1.05, 1.0, 1.3, 1.08, 1.0, 1.1, 1.3, 1.0, 2.0, 1.0, 4.0),
        separator=1,
        default_system=30,
    ),
    "llama3": _Profile(
        words=(0.9, 0.95, 1.0, 1.0, 1.0, 1.05, 1.1, 1.15, 1.35, 1.4, 1.45, 1.7),
        words_other=(0.9, 0.95, 1.05, 1.2, 1.55, 1.75, 2.05, 2.3, 2.6, 2.65, 3.0, 3.3),
        caps=(1.0, 1.0, 1.15, 1.2, 1.5, 1.55, 1.45, 1.55, 2.05, 1.75, 2.9, 1.95),
        per_letter=0.25,
        punct=0.59,
        punct_run=0.025,
        digits_per_token=3,
        newline=0.65,
        newline_runs=True,
        spaces_per_token=1 << 30,
        tab_runs=True,
        latin_additional=0.0,
        scripts=(0.86, 0.44, 0.34, 0.86, 0.92, 0.5, 0.86, 0.64, 0.49, 0.86, 0.75, 0.8, 0.86, 0.8, 0.86, 2.0),
        separator=3,
        default_system=28,
    ),
}

_WORD = re.compile(r"[A-Za-z\u00c0-\u024f\u1e00-\u1eff]+")
_ACCENTED = re.compile(r"[\u00c0-\u024f\u1e00-\u1eff]")
_PUNCT = re.compile(r"[!-/:-@\[-`{-~]")
_NO_PUNCT = dict.fromkeys(c for c in range(0x21, 0x7F) if not chr(c).isalnum())  # str.translate deletes these
_DIGITS = re.compile(r"[0-9]+")
_PUNCT_RUN = re.compile(r"([!-/:-@\[-`{-~])\1{2,}")
_SPACES = re.compile(r" {2,}")
_NEWLINES = re.compile(r"\n+")
_TABS = re.compile(r"\t+")
_LATIN_ADDITIONAL = re.compile(r"[\u1e00-\u1eff]")
_OTHER = re.compile(r"[^\x00-\x7f\u00c0-\u024f\u1e00-\u1eff]")
_SPECIAL = re.compile(r"</s>|<s>|<image>")


def _word_cost(row: tuple[float, ...], per_letter: float, n: int) -> float:
    return row[n - 1] if n <= 12 else row[11] + per_letter * (n - 12)


def _estimate_plain(text: str, p: _Profile) -> float:
    """The estimated cost of text holding no special token."""
    words = _WORD.findall(text)
    lengths = Counter(map(len, words))  # counted in C: a few KB of text costs tens of microseconds
    table = p.words
    other = None
    if not text.isascii():
        other = _OTHER.findall(text)
        letters = sum(n * k for n, k in lengths.items())
        if letters and len(_ACCENTED.findall(text)) * 100 >= letters:
            table = p.words_other
    cost = sum(_word_cost(table, p.per_letter, n) * k for n, k in lengths.items())
    for n in map(len, filter(str.isupper, words)):  # ALL-CAPS words split into more pieces
        if n > 1:
            cost += _word_cost(p.caps, p.per_letter, n) - _word_cost(table, p.per_letter, n)
    # str.translate is fast on ASCII only
    punct = len(text) - len(text.translate(_NO_PUNCT)) if other is None else len(_PUNCT.findall(text))
    if punct > 2:
        for run in _PUNCT_RUN.finditer(text):  # rules and underlines merge into few tokens
            n = run.end() - run.start()
            punct -= n
            cost += 1 + p.punct_run * n
    cost += p.punct * punct
    digits = sum(map(text.count, "0123456789"))
    if digits:
        if p.digits_per_token == 1:
            cost += digits
        else:
            cost += sum(-(-len(run) // p.digits_per_token) for run in _DIGITS.findall(text))
    cost += p.newline * (len(_NEWLINES.findall(text)) if p.newline_runs else text.count("\n"))
    if "  " in text:
        cost += sum(-(-len(run) // p.spaces_per_token) for run in _SPACES.findall(text))
    if "\t" in text:
        cost += len(_TABS.findall(text)) if p.tab_runs else text.count("\t")
    if other:
        if p.latin_additional:
            cost += p.latin_additional * len(_LATIN_ADDITIONAL.findall(text))
        starts, prices = _SCRIPT_STARTS, p.scripts
        cost += sum(prices[bisect.bisect_right(starts, ord(ch)) - 1] * k for ch, k in Counter(other).items())
    return cost


def estimate_tokens(text: str, family: Family = "vicuna") -> int:
    """Estimated tokens of ``text`` (no BOS) for a ``"vicuna"`` (Llama-2) or ``"llama3"``
    tokenizer; ``</s>``, ``<s>`` and ``<image>`` count as the single tokens they are. See the
    module docstring for how it was calibrated and how far off it can be."""
    if family not in _PROFILES:
        raise ConfigurationError(f"family must be 'vicuna' or 'llama3', not {family!r}")
    if not text:
        return 0
    p = _PROFILES[family]
    specials = 0
    pieces = [text]
    if "<" in text and _SPECIAL.search(text):
        pieces = _SPECIAL.split(text)
        for token in _SPECIAL.findall(text):
            specials += p.separator if token != IMAGE_TOKEN else 1
    cost = sum(p.default_system if piece == DEFAULT_SYSTEM else _estimate_plain(piece, p) for piece in pieces if piece)
    return max(1, round(cost) + specials) if text.strip() else max(0, round(cost) + specials)


# ---------------------------------------------------------------------------- tokenizers

_Encode = Callable[[str, bool], list[int]]  # (text, add_special_tokens) -> token ids


def _encoder(tokenizer: Any) -> _Encode:
    """An encoding function for a transformers tokenizer, a ``tokenizers.Tokenizer`` or any
    object whose ``encode(text)`` returns ids (or an ``Encoding``)."""
    if hasattr(tokenizer, "backend_tokenizer") or (callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids")):
        # transformers: call it as the local backend does, so counts agree to the token
        return lambda text, special: list(tokenizer(text, add_special_tokens=special)["input_ids"])
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):

        def ids(text: str, special: bool) -> list[int]:
            try:
                out = encode(text, add_special_tokens=special)
            except TypeError:  # an encode() without the keyword (tiktoken-like)
                out = encode(text)
            return list(getattr(out, "ids", out))

        return ids
    raise ConfigurationError(
        f"cannot count with a {type(tokenizer).__name__}: pass a transformers tokenizer, a "
        "tokenizers.Tokenizer or an object whose encode(text) returns token ids"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_tokenizers(files: dict[str, Path]) -> Any:
    """``tokenizer.json`` through ``tokenizers``, set up the way transformers 5 loads it."""
    try:
        from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    except ImportError:
        return None
    try:
        tok = Tokenizer.from_file(str(files["tokenizer.json"]))
    except Exception as exc:  # a corrupt or foreign file: the exception types are Rust's
        raise ConfigurationError(f"cannot load {files['tokenizer.json']}: {exc}") from None
    config = _read_json(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    if config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
        # transformers 5 rebuilds Llama's pipeline whatever tokenizer.json says: no normalizer,
        # a Metaspace that prefixes "▁" to every segment between special tokens ("legacy")
        # or only to the first one (legacy=False, its default), or never (add_prefix_space=False)
        if config.get("add_prefix_space") is False:
            scheme = "never"
        else:
            scheme = "always" if config.get("legacy", False) else "first"
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    # added tokens listed in tokenizer_config.json only (transformers adds them; it ignores added_tokens.json)
    listed = [t for t in (_token_text(v) for v in (config.get("added_tokens_decoder") or {}).values()) if t]
    vocab = tok.get_vocab(with_added_tokens=True)
    missing = [t for t in dict.fromkeys(listed) if t not in vocab]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok


_PLACEHOLDER = "x"  # the user text a conversation without one is counted with (then taken off)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _model_files(model: str | os.PathLike) -> dict[str, Path]:
    """The tokenizer and config files of a directory or of a cached Hub snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        return {name: path / name for name in _TOKENIZER_FILES if (path / name).is_file()}
    text = os.fspath(model)
    if path.exists() or not _HUB_ID.fullmatch(text):
        raise ConfigurationError(f"model directory {text!r} does not exist")
    try:  # a cache lookup: reads the local cache only, never the network
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return {}
    found: dict[str, Path] = {}
    for name in _TOKENIZER_FILES:
        try:
            hit = try_to_load_from_cache(text, name)
        except ValueError:  # an id the Hub would refuse (HFValidationError): nothing cached
            return {}
        if isinstance(hit, str):
            found[name] = Path(hit)
    return found


def _vision_tokens(config: dict[str, Any], where: Path) -> int | None:
    """Image positions from a LLaVA ``config.json``, computed as ``prepare-model`` does (the
    processor's expansion: patches, plus CLIP's CLS slot, less the one "default" drops)."""
    if config.get("model_type") != "llava":
        return None
    from .prepare import _vision

    try:
        return _vision(config, where).tokens_per_image
    except ConfigurationError:  # a tower prepare-model does not know: keep the model's figure
        return None


# ---------------------------------------------------------------------------- the counter


class TokenCounter:
    """Counts what Mantis sees: ``count(conversation)`` for a whole prompt, ``count_text(text)``
    for a bare string.

    ``tokenizer`` (a transformers tokenizer, a ``tokenizers.Tokenizer``, or anything with an
    ``encode(text)`` returning ids) makes counts exact; without one they are estimates for
    ``family`` (see :func:`estimate_tokens`). ``tokens_per_image``, ``context_length`` and
    ``family`` default to what :func:`model_info` says of ``model`` (576, 4,096 and Vicuna for
    Mantis-llava-7b). Counting never does I/O and never imports anything.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        model: str | os.PathLike | None = None,
        tokens_per_image: int | None = None,
        context_length: int | None = None,
        family: Family | None = None,
        source: str | None = None,
    ) -> None:
        info = model_info(model)
        for name, value in (("tokens_per_image", tokens_per_image), ("context_length", context_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"{name}={value!r} is invalid: expected a positive integer")
        if family is not None and family not in _PROFILES:
            raise ConfigurationError(f"family must be 'vicuna' or 'llama3', not {family!r}")
        self.tokens_per_image: int = tokens_per_image or info.tokens_per_image
        self.context_length: int = context_length or info.context_length
        self.family: Family = family or info.family
        self.tokenizer = tokenizer
        self._encode = _encoder(tokenizer) if tokenizer is not None else None
        self.source: str = source or ("tokenizer" if tokenizer is not None else f"estimate ({self.family})")

    def __repr__(self) -> str:
        return (
            f"TokenCounter(source={self.source!r}, tokens_per_image={self.tokens_per_image}, "
            f"context_length={self.context_length})"
        )

    @property
    def exact(self) -> bool:
        """Whether text counts come from the model's tokenizer (else they are estimates)."""
        return self._encode is not None

    # -- building

    @classmethod
    def from_backend(cls, backend: Any) -> TokenCounter:
        """The best counter for a backend: a loaded local backend's own tokenizer and measured
        image size (exact); otherwise the tokenizer files of ``backend.model`` when it names a
        directory or a Hub snapshot in the local cache (a local backend not loaded yet, an
        OpenAI-compatible server of a prepared model), else an estimate for the model's name
        (fal). Never loads a model, never downloads."""
        model = getattr(backend, "model", None)
        own = getattr(backend, "loaded_token_counter", None)  # TransformersBackend: never loads
        if callable(own) and (counter := own()) is not None:
            return counter
        if model:  # a local directory or a cached Hub snapshot (local backend, a served prepared model)
            try:
                return cls.from_pretrained(model, context_length=getattr(backend, "max_context", None))
            except ConfigurationError:
                pass  # not one: the backend says what is wrong with its model when it runs
        return cls(model=model)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        tokens_per_image: int | None = None,
        context_length: int | None = None,
    ) -> TokenCounter:
        """A counter from a model directory (a checkpoint, a ``prepare-model`` output, the tiny
        test model) or a Hub id whose files are already in the local Hugging Face cache.

        Reads ``tokenizer.json`` with ``tokenizers`` (set up as transformers 5 would: see
        :func:`_load_tokenizers`), and the image size and context length from ``config.json``.
        Without ``tokenizers`` or a ``tokenizer.json`` (a repo with only SentencePiece's
        ``tokenizer.model``) the counter estimates. Nothing is downloaded. A local path that
        does not exist is a :class:`~mantis_llm.errors.ConfigurationError`.
        """
        files = _model_files(model)
        config = _read_json(files["config.json"]) if "config.json" in files else {}
        text_config = config.get("text_config") or {}
        per_image = tokens_per_image or _vision_tokens(config, files.get("config.json", Path(model)))
        context = context_length or text_config.get("max_position_embeddings") or config.get("max_position_embeddings")
        tokenizer = _load_tokenizers(files) if "tokenizer.json" in files else None
        vocab = text_config.get("vocab_size") or config.get("vocab_size")
        family: Family | None = "llama3" if isinstance(vocab, int) and vocab > 100_000 else None  # 128k: Llama-3
        return cls(
            tokenizer,
            model=model,
            tokens_per_image=per_image,
            context_length=int(context) if context else None,
            family=family,
            source=f"tokenizer.json of {os.fspath(model)}" if tokenizer is not None else None,
        )

    # -- counting

    def count_text(self, text: str) -> int:
        """Tokens of ``text`` alone, without BOS (LangChain's ``get_num_tokens``)."""
        if self._encode is not None:
            return len(self._encode(text, False))
        return estimate_tokens(text, self.family)

    def token_ids(self, text: str) -> list[int]:
        """The ids of ``text`` (without BOS), from the model's tokenizer. Without one there are
        no ids to give: a :class:`~mantis_llm.errors.ConfigurationError` (counts still work)."""
        if self._encode is None:
            raise ConfigurationError(
                f"token ids need the model's tokenizer, and this counter estimates ({self.source}); "
                "count_text() and count() work without it, or build the counter with "
                "TokenCounter.from_pretrained(<model directory>)"
            )
        return self._encode(text, False)

    def count_rendered(self, rendered: RenderedPrompt) -> int:
        """Tokens of a rendered prompt: its text with BOS, each ``<image>`` expanded."""
        n_images = len(rendered.images)
        if self._encode is not None:
            text_tokens = len(self._encode(rendered.text, True))
        else:
            text_tokens = 1 + estimate_tokens(rendered.text, self.family)  # 1: BOS
        return text_tokens - n_images + n_images * self.tokens_per_image

    def count(self, conversation: Conversation) -> int:
        """Prompt tokens of ``conversation`` as the model receives it (template and images included).

        A conversation Mantis could not be sent (no user message, as in the partial lists
        LangChain's ``trim_messages`` measures) is counted as rendered with an empty user turn
        at the end; an empty one is 0."""
        if not conversation.turns:
            return 0
        try:
            return self.count_rendered(render(conversation, "local"))
        except InvalidRequestError:  # no user message, or no user text or image
            padded = Conversation([*conversation.turns, Turn("user", [_PLACEHOLDER])])
            extra = self.count_text(f"{SEP}USER: {_PLACEHOLDER}") - self.count_text(SEP)
            return self.count_rendered(render(padded, "local")) - extra

    def count_request(self, request: Request) -> int:
        """Prompt tokens of the first model call ``request`` makes: with tools or a response
        format, its conversation carries the instruction the tool flow adds (tool catalog,
        format, example), as :func:`mantis_llm.tools.generate` sends it."""
        from .tools import check_spec, instruct, passes_through  # jsonschema: only when asked

        if not passes_through(request):
            request = instruct(request, check_spec(request.tools, request.response_format))
        return self.count(request.conversation)

    def room(self, conversation: Conversation) -> int:
        """Tokens left for the answer in ``context_length`` (negative when the prompt does not fit)."""
        return self.context_length - self.count(conversation)
