"""Grammar-constrained decoding for the local backend, with llguidance.

Three pieces:

* :func:`lark_grammar` writes the grammar (llguidance's Lark dialect) for "a JSON value of
  this schema", or for "free text, or a JSON value of this schema" (tool calls in auto mode).
  JSON is compact (no whitespace, separators :data:`JSON_SEPARATORS`), so a bounded schema
  always closes in a bounded number of tokens.
* :class:`GrammarCompiler` belongs to one tokenizer: it builds llguidance's ``LLTokenizer``
  once and caches compiled grammars by their text. A schema llguidance cannot handle raises
  :class:`~mantis_llm.errors.InvalidRequestError` when compiled, before anything is queued.
* :class:`GrammarLogitsProcessor` is a transformers logits processor for one ``generate``
  call: one matcher per batch row (or ``None`` for a free row). It advances each matcher
  with the row's previous token and masks the row's scores to what the grammar allows.

torch and llguidance are imported on first use, never when this module is imported.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigurationError, InvalidRequestError
from ._deps import import_llguidance

__all__ = [
    "JSON_SEPARATORS",
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarLogitsProcessor",
    "lark_grammar",
]


#: The item and key separators of the JSON the grammar admits (``json.dumps(obj,
#: separators=JSON_SEPARATORS)`` writes the same form: show the model examples in it).
JSON_SEPARATORS = (",", ":")

# Free text for auto mode: it may start with whitespace, but its first visible character is
# neither "{" nor "[", so anything that looks like a call is held to the schema.
_TEXT_TERMINAL = r"/\s*[^\s{\[](?s:.)*/"

# llguidance's "x-guidance" whitespace options: ours win over the schema's own, since
# compact output is what bounds the length of a call
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def lark_grammar(schema: dict[str, Any] | None, *, allow_text: bool) -> str:
    """The Lark grammar (llguidance dialect) for a compact JSON value of ``schema``.

    ``schema=None`` means any JSON object. With ``allow_text=True`` the output is either
    that JSON value or free text whose first non-space character is not ``{`` or ``[``
    (text must not be empty). One optional leading space is always allowed before the
    JSON: after ``ASSISTANT:`` a sentencepiece model's natural first token is ``▁{``.

    The grammar bounds the length of the JSON only as far as the schema does: bound strings
    (``maxLength``) and numbers, and close objects (``"additionalProperties": false``), or
    the output may run to ``max_tokens``. ``"#/$defs/..."`` refers to the root of
    ``schema``: hoist nested tools' ``$defs`` to it.
    """
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"a JSON schema must be a dict, not {type(schema).__name__}")
    given = schema.get("x-guidance")
    options = {**(given if isinstance(given, dict) else {}), **_JSON_OPTIONS}
    try:
        # ensure_ascii keeps the embedded schema plain ASCII inside the Lark text
        body = json.dumps({**schema, "x-guidance": options}, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"the JSON schema is not serialisable as JSON: {exc}") from None
    if allow_text:
        return f'start: TEXT | " "? value\nTEXT: {_TEXT_TERMINAL}\nvalue: %json {body}\n'
    return f'start: " "? value\nvalue: %json {body}\n'


# "at 2(8): failed to compile JSON schema: Unknown format: foo\n   1 | start: ...": keep the
# reason, drop the position and the quoted grammar (which repeats the whole schema)
_ERROR_POSITION = re.compile(r"^at \d+\(\d+\): ")
_ERROR_EXCERPT = re.compile(r"^\s*\d+ \| |^\s*\^\s*$")


def _grammar_error(message: str) -> str:
    lines = []
    for line in message.strip().splitlines():
        if _ERROR_EXCERPT.match(line):
            break
        lines.append(line.strip())
    text = _ERROR_POSITION.sub("", " ".join(x for x in lines if x)) or "unknown error"
    return text.removeprefix("failed to compile JSON schema: ")


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A grammar compiled for one tokenizer; :meth:`matcher` hands out fresh matchers."""

    text: str
    compile_seconds: float
    warnings: tuple[str, ...]
    _proto: Any = field(repr=False)
    _lock: threading.Lock = field(repr=False)

    def matcher(self) -> Any:
        """A new ``llguidance.LLMatcher`` at the start of the grammar (about 1 µs: a copy).

        Safe from any thread; the matcher may then be used on another thread, one at a time.
        """
        with self._lock:
            return self._proto.deep_copy()


class GrammarCompiler:
    """Compiles grammars for one tokenizer and caches them by grammar text.

    ``n_vocab`` is the model's logits width (32064 for Mantis-llava-7b, more than
    ``len(tokenizer)``); it defaults to ``len(tokenizer)``. ``eos_ids`` are the tokens that
    end generation (default: the tokenizer's EOS); the grammar allows them exactly where the
    output is complete. The ``LLTokenizer`` is built on first use (about 0.2 s for a 32k
    sentencepiece vocabulary, 1 s or more for 128k ones), once. Thread-safe.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        n_vocab: int | None = None,
        eos_ids: Iterable[int] | None = None,
        max_cached: int = 128,
    ) -> None:
        self.tokenizer = tokenizer
        self.n_vocab = int(n_vocab if n_vocab is not None else len(tokenizer))
        eos = sorted({int(e) for e in eos_ids}) if eos_ids is not None else []
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = [int(tokenizer.eos_token_id)]
        if not eos:
            raise ConfigurationError("grammar-constrained generation needs an EOS token id")
        self.eos_ids: tuple[int, ...] = tuple(eos)
        self.max_cached = max_cached
        self.hits = 0
        self.misses = 0
        self.tokenizer_seconds: float | None = None
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._token_classes: Any = None

    @property
    def lltokenizer(self) -> Any:
        """The ``llguidance.LLTokenizer`` (built on first access, then shared)."""
        if self._lltokenizer is None:
            with self._lock:
                if self._lltokenizer is None:
                    self._lltokenizer = self._build_tokenizer()
        return self._lltokenizer

    def _build_tokenizer(self) -> Any:
        llg = import_llguidance()
        started = time.perf_counter()
        try:
            lltok = llg.hf.from_tokenizer(self.tokenizer, n_vocab=self.n_vocab, eos_token=list(self.eos_ids))
        except Exception as exc:  # a slow tokenizer (ValueError) or one the Rust side rejects
            raise ConfigurationError(
                f"grammar-constrained generation cannot use this tokenizer ({type(self.tokenizer).__name__}): {exc}"
            ) from None
        self.tokenizer_seconds = time.perf_counter() - started
        return lltok

    def compile(self, grammar: str) -> CompiledGrammar:
        """Compile a Lark grammar (or fetch it from the cache: same text, same object).

        Raises :class:`~mantis_llm.errors.InvalidRequestError` naming the problem when
        llguidance rejects the grammar, e.g. a JSON schema with an unsupported keyword.
        """
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                self.hits += 1
                return hit
        llg = import_llguidance()
        lltok = self.lltokenizer
        started = time.perf_counter()
        # outside the lock: a big grammar takes a while (llguidance drops the GIL meanwhile)
        # and other callers' cache hits must not wait for it
        limits = llg.LLParserLimits(verbose_errors=False)  # errors must not dump the whole state
        proto = llg.LLMatcher(lltok, llg.LLMatcher.grammar_from_lark(grammar), log_level=0, limits=limits)
        if proto.is_error():
            raise InvalidRequestError(
                f"cannot constrain the output to this schema: {_grammar_error(proto.get_error())}",
                detail=proto.get_error(),
            )
        # compute the first mask once: the lexer states it builds are shared by every copy,
        # and it catches a grammar that admits no output at all
        if not any(proto.compute_bitmask()):
            raise InvalidRequestError("cannot constrain the output to this schema: it admits no value")
        compiled = CompiledGrammar(
            text=grammar,
            compile_seconds=time.perf_counter() - started,
            warnings=tuple(proto.get_grammar_warnings()),
            _proto=proto,
            _lock=threading.Lock(),
        )
        with self._lock:
            self.misses += 1
            compiled = self._cache.setdefault(grammar, compiled)  # a concurrent compile may have won
            self._cache.move_to_end(grammar)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return compiled

    def compile_schema(self, schema: dict[str, Any] | None, *, allow_text: bool = False) -> CompiledGrammar:
        """``compile(lark_grammar(schema, allow_text=allow_text))``."""
        return self.compile(lark_grammar(schema, allow_text=allow_text))

    def processor(
        self, matchers: Sequence[Any | None], budgets: Sequence[int | None] | None = None
    ) -> GrammarLogitsProcessor:
        """A :class:`GrammarLogitsProcessor` for one batch, with this compiler's vocabulary;
        ``budgets[i]`` is row ``i``'s ``max_new_tokens`` (it closes its JSON in time)."""
        return GrammarLogitsProcessor(
            matchers, n_vocab=self.n_vocab, eos_ids=self.eos_ids, budgets=budgets, classes=self.token_classes
        )

    @property
    def token_classes(self) -> TokenClasses:
        """Which tokens close JSON, open it, or are blank (computed once, on first use)."""
        if self._token_classes is None:
            with self._lock:
                if self._token_classes is None:
                    self._token_classes = TokenClasses.of(self.tokenizer, self.n_vocab)
        return self._token_classes

    @property
    def cached(self) -> int:
        """How many compiled grammars the cache holds."""
        return len(self._cache)


@dataclass(frozen=True)
class TokenClasses:
    """What a row needs to close its JSON before its token budget runs out: each token's
    text (to follow whether the row is inside a string), and bitmasks (one bit per token id)
    of the tokens that end a string (``"`` then only ``"]}``), that close containers (only
    ``]}``), that start JSON after optional blanks (``{``, ``[``), and blank ones."""

    texts: tuple[str, ...]
    quote_closers: Any  # numpy uint32 words
    bracket_closers: Any
    openers: Any
    blanks: Any

    @classmethod
    def of(cls, tokenizer: Any, n_vocab: int) -> TokenClasses:
        import numpy as np

        words = (n_vocab + 31) // 32
        names = ("quote_closers", "bracket_closers", "openers", "blanks")
        masks = {name: np.zeros(words, dtype=np.uint32) for name in names}
        texts = []
        for t in range(min(len(tokenizer), n_vocab)):
            text = tokenizer.decode([t])
            texts.append(text)
            name = None
            if text[:1] == '"' and set(text) <= set('"]}'):
                name = "quote_closers"
            elif text and set(text) <= set("]}"):
                name = "bracket_closers"
            elif text.lstrip()[:1] in ("{", "["):
                name = "openers"
            elif text and not text.strip():
                name = "blanks"
            if name is not None:
                masks[name][t >> 5] |= np.uint32(1 << (t & 31))
        return cls(texts=tuple(texts), **masks)


@dataclass
class _JsonState:
    """Where a row is in its JSON text: inside a string (after an unescaped quote) or not."""

    started: bool | None = None  # None until the first visible token; False: a text answer
    in_string: bool = False
    escape: bool = False

    def feed(self, text: str) -> None:
        for c in text:
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True


# A row whose JSON is not complete this close to its max_new_tokens prefers tokens that close
# it (end a string, an array, an object): a grammar guarantees a valid prefix, and this makes
# the whole value fit. It only cuts a string short that would otherwise be cut mid-way.
CLOSING_RESERVE = 48  # tokens (at most half the budget)


class GrammarLogitsProcessor:
    """Constrains the rows of one ``model.generate`` batch, each to its own grammar.

    ``matchers[i]`` is row ``i``'s ``LLMatcher`` (from :meth:`CompiledGrammar.matcher`; it is
    reset here, so a retried batch starts clean) or ``None`` for a free row, whose scores are
    never touched. Pass as ``generate(..., logits_processor=[processor])``; one processor per
    ``generate`` call, used on the thread that runs it.

    Each call advances every followed row by the token it produced at the previous step
    (the first call sees only the prompt), then masks the row's scores. A row whose grammar
    is complete may only produce EOS, and so may a row at a dead end, so sampling never
    meets a row of all ``-inf``. A token the mask did not allow (the pad ``generate`` writes
    into a row a stopping criterion ended) is never fed to a matcher: the row is dropped.

    Call :meth:`finish_row` with a row's generated ids when it ends (the last token is never
    seen by a later call); it returns whether they complete the grammar.
    """

    def __init__(
        self,
        matchers: Sequence[Any | None],
        *,
        n_vocab: int,
        eos_ids: Iterable[int],
        budgets: Sequence[int | None] | None = None,
        classes: TokenClasses | None = None,
    ) -> None:
        import numpy as np
        import torch

        self._torch = torch
        self.matchers: list[Any] = list(matchers)  # LLMatcher or None
        followed = [id(m) for m in self.matchers if m is not None]
        if len(set(followed)) != len(followed):
            raise ValueError("each row needs its own matcher (the same one was given twice)")
        self.n_vocab = int(n_vocab)
        self.eos_ids = tuple(sorted({int(e) for e in eos_ids}))
        if not self.eos_ids or max(self.eos_ids) >= self.n_vocab:
            raise ValueError(f"eos_ids {self.eos_ids} must be non-empty token ids below n_vocab={self.n_vocab}")
        if sys.byteorder != "little":  # the byte view of the bitmask below assumes it
            raise RuntimeError("grammar masking needs a little-endian machine")
        batch, self._words = len(self.matchers), (self.n_vocab + 31) // 32
        self._bitmask = torch.zeros((batch, self._words), dtype=torch.int32)
        self._np = self._bitmask.numpy()  # same memory: cheap bit tests and the fill pointer
        self._eos_mask = np.zeros(self._words, dtype=np.uint32)
        for e in self.eos_ids:
            self._eos_mask[e >> 5] |= np.uint32(1 << (e & 31))
        self._live = [m is not None for m in self.matchers]  # still followed by this processor
        self._pos = [0] * batch  # generated tokens consumed (or judged) per row
        self._mask_pos = [-1] * batch  # which position row i's current bitmask row is for
        self._prompt_len: int | None = None
        self._luts: dict[Any, Any] = {}
        self._budgets = list(budgets) if budgets is not None else [None] * batch
        self._classes = classes
        self._json = [_JsonState() for _ in range(batch)]
        self.calls = 0
        self.seconds = 0.0  # time spent in this processor (benchmarks, logs)
        for m in self.matchers:
            if m is not None:
                m.reset()

    # ---------------------------------------------------------------- per row

    def accepted(self, row: int) -> bool | None:
        """Whether row ``row``'s tokens so far complete its grammar (None: a free row)."""
        m = self.matchers[row]
        if m is None:
            return None
        return bool(m.is_accepting()) and not m.is_error()

    def finish_row(self, row: int, ids: Sequence[int]) -> bool | None:
        """Row ``row`` ended with generated tokens ``ids``: feed the ones not seen yet, stop
        following the row, and return :meth:`accepted`. Tokens after a rejected one (e.g.
        trailing pads in ``generate``'s output) are ignored."""
        if self.matchers[row] is None:
            return None
        if self._live[row]:
            self._advance(row, list(ids[self._pos[row] :]))
            self._live[row] = False
        return self.accepted(row)

    def _advance(self, i: int, tokens: list[int]) -> None:
        """Feed row ``i`` its new tokens, stopping (and dropping the row) at a rejected one."""
        m = self.matchers[i]
        for t in tokens:
            if self._mask_pos[i] == self._pos[i]:
                # the mask this token was sampled under: a bit test, no call into llguidance
                ok = 0 <= t < self.n_vocab and (int(self._np[i, t >> 5]) >> (t & 31)) & 1
            else:  # only from finish_row with more than one unseen token
                ok = not m.is_stopped() and m.validate_tokens([t]) == 1
            if not ok:
                self._live[i] = False
                return
            self._pos[i] += 1
            classes, state = self._classes, self._json[i]
            if classes is not None and state.started is not False:
                if state.started is None and self._has(classes.openers, t):
                    state.started = True
                elif state.started is None and not self._has(classes.blanks, t):
                    state.started = False  # a text answer ("text or a call" grammars)
                if state.started and t < len(classes.texts):
                    state.feed(classes.texts[t])
            if m.is_stopped():  # complete: only EOS was allowed, and feeding it adds nothing
                continue
            if not m.consume_token(t):  # cannot happen for an allowed token; be safe anyway
                self._live[i] = False
                return

    def _fill(self, i: int) -> None:
        """Row ``i``'s mask for its next token (EOS only when complete or at a dead end)."""
        m = self.matchers[i]
        row = self._np[i]
        self._mask_pos[i] = self._pos[i]
        if m.is_stopped():  # complete (llguidance would say the same, for a call more)
            row[:] = self._eos_mask.view(row.dtype)
            return
        if not m.is_error():
            m.unsafe_compute_mask_ptr(self._np.ctypes.data + i * self._words * 4, self._words * 4)
            if row.any():
                self._close_in_time(i, row)
                return
        # a dead end: end the row with EOS rather than crash sampling, and feed the matcher
        # nothing more (EOS is not in its language here); accepted() stays False
        row[:] = self._eos_mask.view(row.dtype)
        self._live[i] = False

    @staticmethod
    def _has(words: Any, t: int) -> bool:
        return bool((int(words[t >> 5]) >> (t & 31)) & 1)

    def _close_in_time(self, i: int, row: Any) -> None:
        """Near the end of row ``i``'s budget, keep only the allowed tokens that close its JSON
        (when there are any: where a key or a value is still required, the grammar decides)."""
        budget, classes, state = self._budgets[i], self._classes, self._json[i]
        if budget is None or classes is None or state.started is False:
            return
        if budget - self._pos[i] > min(CLOSING_RESERVE, budget // 2):
            return
        # in a string: end it; else: close an array or object where the grammar allows it
        closers = classes.quote_closers if state.in_string else classes.bracket_closers
        closing = row & closers.view(row.dtype)
        if closing.any():
            row[:] = closing

    # ---------------------------------------------------------------- the batch

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        started = time.perf_counter()
        batch, width = scores.shape
        if batch != len(self.matchers):
            raise ValueError(f"the batch has {batch} rows but the processor was built for {len(self.matchers)}")
        if width < self.n_vocab:
            raise ValueError(f"the scores have {width} columns but the grammar vocabulary has {self.n_vocab}")
        self.calls += 1
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
        else:
            generated = input_ids.shape[1] - self._prompt_len
            behind = [i for i in range(batch) if self._live[i] and self._pos[i] < generated]
            if behind:
                last = input_ids[:, -1].tolist()  # one device sync for all rows
                for i in behind:
                    if self._pos[i] == generated - 1:
                        self._advance(i, [last[i]])
                    else:  # a step this processor did not see (not done by generate today)
                        self._advance(i, input_ids[i, self._prompt_len + self._pos[i] :].tolist())
        rows = [i for i in range(batch) if self._live[i]]
        if rows:
            for i in rows:
                self._fill(i)
            self._mask(scores, rows)
        self.seconds += time.perf_counter() - started
        return scores

    def _mask(self, scores: Any, rows: list[int]) -> None:
        """Add 0 / -inf to the scores of ``rows`` from their bitmask rows, in plain torch
        ops on the scores' device (not llguidance's ``@torch.compile`` kernel)."""
        torch = self._torch
        device = scores.device
        lut = self._luts.get((device, scores.dtype))
        if lut is None:
            # byte value -> the 8 additive masks of its bits, least significant bit first
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
            lut = torch.where(bits == 1, 0.0, float("-inf")).to(device=device, dtype=scores.dtype)
            self._luts[(device, scores.dtype)] = lut
        every = len(rows) == len(self.matchers)
        packed = self._bitmask if every else self._bitmask[rows]
        # an int32 word is 4 little-endian bytes: byte k of row r holds tokens 8k .. 8k+7
        index = packed.view(torch.uint8).to(device).long()
        bias = lut[index].view(len(rows), -1)  # [rows, words * 32]
        width = scores.shape[1]
        if bias.shape[1] >= width:
            bias = bias[:, :width]
        else:  # logits wider than the bitmask: the extra ids are no tokens of the grammar
            bias = torch.nn.functional.pad(bias, (0, width - bias.shape[1]), value=float("-inf"))
        if every:
            scores.add_(bias)
        else:
            scores.index_add_(0, torch.tensor(rows, device=device), bias)
