"""Grammar-constrained decoding (llguidance) on the tiny random-weight Mantis.

With random weights every valid answer is the grammar's doing: the model itself writes
random bytes. Batches are built as the local backend builds them (left padding, one
stopping criterion following every row).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from dataclasses import dataclass

import jsonschema
import pytest
import torch
from PIL import Image as PILImage
from transformers import StoppingCriteriaList

from mantis_llm.backends.local.grammar import (
    JSON_SEPARATORS,
    GrammarCompiler,
    GrammarLogitsProcessor,
    lark_grammar,
)
from mantis_llm.errors import InvalidRequestError
from mantis_llm.testing import build_tiny_mantis, make_image_bytes

pytest.importorskip("llguidance")

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SEEDS = range(20)

# Bounded schemas: strings with maxLength, bounded numbers, enums, and closed objects. An
# object without "additionalProperties": false admits any number of extra keys (the random
# model happily writes them until max_tokens), so it has no bounded length.

# (a) a bounded string, a Literal (enum) and a bool
ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 20},
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "ok": {"type": "boolean"},
    },
    "required": ["answer", "mood", "ok"],
    "additionalProperties": False,
}


def envelope(name: str, params: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}, "hours": {"type": "integer", "minimum": 0, "maximum": 23}},
    "required": ["zone", "hours"],
    "additionalProperties": False,
}
# (b) the envelope for one tool, and (parallel calls) a list of calls over two tools
CALL = envelope("get_weather", WEATHER)
CALLS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 2,
    "items": {"anyOf": [envelope("get_weather", WEATHER), envelope("get_time", TIME)]},
}

# Worst case for these schemas with the tiny model's byte tokenizer (one token per byte):
# a string character costs at most 12 bytes (a \uXXXX\uXXXX surrogate pair), so 20 of them
# 240, plus about 45 bytes of structure and EOS. Every constrained answer must close (EOS)
# within this limit; in practice they take 60 to 110 tokens.
MAX_NEW = 300


# ---------------------------------------------------------------------------- fixtures


@dataclass
class Tiny:
    model: object
    processor: object
    tokenizer: object
    n_vocab: int
    eos_ids: frozenset[int]
    pad_id: int


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    """The tiny CLIP Mantis, loaded the way the local backend loads a model."""
    from transformers import AutoConfig, LlavaForConditionalGeneration, LlavaProcessor

    path = build_tiny_mantis(tmp_path_factory.mktemp("grammar-tiny") / "clip")
    config = AutoConfig.from_pretrained(path)
    processor = LlavaProcessor.from_pretrained(
        path,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    model = LlavaForConditionalGeneration.from_pretrained(path, config=config, dtype=torch.float32).eval()
    tok = processor.tokenizer
    eos = {tok.eos_token_id, model.generation_config.eos_token_id} - {None}
    return Tiny(
        model=model,
        processor=processor,
        tokenizer=tok,
        n_vocab=model.get_output_embeddings().weight.shape[0],  # the logits width
        eos_ids=frozenset(int(e) for e in eos),
        pad_id=tok.pad_token_id,
    )


@pytest.fixture(scope="session")
def compiler(tiny) -> GrammarCompiler:
    return GrammarCompiler(tiny.tokenizer, n_vocab=tiny.n_vocab, eos_ids=tiny.eos_ids)


# ---------------------------------------------------------------------------- helpers


def prompt_ids(tiny: Tiny, text: str, n_images: int = 0):
    """A Mantis prompt through the real processor: (input_ids [n], pixel_values or None)."""
    wrappers = "".join(f"(image {j}: <Image><image></Image>) " for j in range(1, n_images + 1))
    images = [PILImage.open(io.BytesIO(make_image_bytes(48 + 8 * j, 40))).convert("RGB") for j in range(n_images)]
    enc = tiny.processor(
        text=[f"{SYSTEM}</s>USER: {wrappers}{text}</s>ASSISTANT:"], images=images or None, return_tensors="pt"
    )
    return enc["input_ids"][0], enc.get("pixel_values") if images else None


class Rows:
    """Stopping criterion standing in for the backend's row tracker: records each row's
    tokens, ends a row on EOS or after ``limits[i]`` tokens, and tells the processor."""

    def __init__(self, processor: GrammarLogitsProcessor, eos_ids, limits) -> None:
        self.processor, self.eos_ids, self.limits = processor, eos_ids, limits
        self.ids: list[list[int]] = [[] for _ in limits]
        self.done = [False] * len(limits)
        self.accepted: list[bool | None] = [None] * len(limits)

    def finish(self, i: int) -> None:
        self.done[i] = True
        self.accepted[i] = self.processor.finish_row(i, self.ids[i])

    def __call__(self, input_ids, scores=None, **kwargs):
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if self.done[i]:
                continue
            self.ids[i].append(token)
            if token in self.eos_ids or len(self.ids[i]) >= self.limits[i]:
                self.finish(i)
        return torch.tensor(self.done, device=input_ids.device)


@dataclass
class Out:
    ids: list[int]
    text: str
    accepted: bool | None
    ended: bool  # by EOS


def run(tiny, compiler, rows, *, sample=False, seed=0, max_new=MAX_NEW, limits=None, extra_processors=(), criteria=()):
    """Generate one left-padded batch: ``rows`` are (prompt, n_images, grammar or None)."""
    prompts = [prompt_ids(tiny, text, n) for text, n, _ in rows]
    width = max(len(ids) for ids, _ in prompts)
    input_ids = torch.full((len(rows), width), tiny.pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, _) in enumerate(prompts):  # left padding, as the backend does
        input_ids[i, width - len(ids) :] = ids
        attention[i, width - len(ids) :] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention}
    pixels = [p for _, p in prompts if p is not None]
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)
    matchers = [None if g is None else g.matcher() for _, _, g in rows]
    processor = compiler.processor(matchers)
    tracker = Rows(processor, tiny.eos_ids, limits or [max_new] * len(rows))
    kwargs = dict(
        max_new_tokens=max_new,
        pad_token_id=tiny.pad_id,
        eos_token_id=sorted(tiny.eos_ids),
        logits_processor=[*extra_processors, processor],
        stopping_criteria=StoppingCriteriaList([*criteria, tracker]),
    )
    if sample:
        kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False)
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tiny.model.generate(**inputs, **kwargs)
    for i in range(len(rows)):
        if not tracker.done[i]:
            tracker.finish(i)
    return [
        Out(
            ids=ids,
            text=tiny.tokenizer.decode(ids, skip_special_tokens=True),
            accepted=tracker.accepted[i],
            ended=bool(ids) and ids[-1] in tiny.eos_ids,
        )
        for i, ids in enumerate(tracker.ids)
    ], processor


def assert_valid(out: Out, schema: dict) -> object:
    assert out.ended and out.accepted is True, out
    value = json.loads(out.text)  # strict: no raw control characters in strings
    jsonschema.validate(value, schema)
    # compact: exactly what json.dumps writes with the advertised separators (the optional
    # leading space aside)
    assert out.text.lstrip(" ") == json.dumps(value, separators=JSON_SEPARATORS, ensure_ascii=False) or "\\" in out.text
    return value


def tokens(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def feeds(matcher, ids) -> bool:
    return all(matcher.consume_token(t) for t in ids)


# ---------------------------------------------------------------------------- grammar text


def test_lark_grammar_text():
    g = lark_grammar(CALL, allow_text=False)
    assert g.startswith('start: " "? value\n') and "%json" in g and "TEXT" not in g
    body = json.loads(g.split("%json", 1)[1])
    assert body["x-guidance"] == {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    assert body["properties"] == CALL["properties"]  # property order kept (llguidance enforces it)
    auto = lark_grammar(CALL, allow_text=True)
    assert auto.startswith('start: TEXT | " "? value\n')
    assert json.loads(lark_grammar(None, allow_text=False).split("%json", 1)[1])["type"] == "object"
    # a schema's own x-guidance options survive, but not flexible whitespace
    own = lark_grammar({"x-guidance": {"lenient": True, "whitespace_flexible": True}}, allow_text=False)
    own = json.loads(own.split("%json", 1)[1])
    assert own["x-guidance"]["lenient"] is True and own["x-guidance"]["whitespace_flexible"] is False
    with pytest.raises(InvalidRequestError, match="must be a dict"):
        lark_grammar([CALL], allow_text=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="not serialisable"):
        lark_grammar({"default": object()}, allow_text=False)


def test_importing_the_module_imports_neither_torch_nor_llguidance():
    code = (
        "import sys\n"
        "from mantis_llm.backends.local.grammar import lark_grammar, GrammarCompiler\n"
        "lark_grammar({'type': 'object'}, allow_text=True)\n"
        "print(sorted(m for m in ('torch', 'llguidance', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_grammar_admits_exactly_compact_json_and_optional_text(compiler, tiny):
    tok = tiny.tokenizer
    call = compiler.compile_schema(CALL)
    auto = compiler.compile_schema(CALL, allow_text=True)
    good = '{"name":"get_weather","arguments":{"city":"Paris"}}'
    for grammar, text, ok in [
        (call, good, True),
        (call, " " + good, True),  # the one optional leading space
        (call, "  " + good, False),
        (call, '{"name": "get_weather"', False),  # no whitespace beyond what is needed
        (call, '{"name":"get_time"', False),
        (call, good + " ", False),  # nothing after the value
        (call, "Hello", False),
        (auto, good, True),
        (auto, " Hello, {not a call}", True),
        (auto, "\nHello", True),
        (auto, " [1]", False),
        (auto, "\n{", False),  # text cannot hide a call behind whitespace
        (auto, '{"name":"other"', False),
    ]:
        m = grammar.matcher()
        assert feeds(m, tokens(tok, text)) is ok, (text, m.get_error())
    m = call.matcher()
    assert feeds(m, tokens(tok, good)) and m.is_stopped() and m.is_accepting()
    m = auto.matcher()
    assert feeds(m, tokens(tok, " Sure")) and m.is_accepting() and not m.is_stopped()
    assert not auto.matcher().is_accepting()  # an empty answer is not a text answer


def _sentencepiece_tokenizer():
    """A Llama/Vicuna-style tokenizer ("▁" pieces, byte fallback) with a "▁{" token."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    pieces = ["▁", "{", "}", '"', ":", ",", "a", "H", "i", "▁{", "▁H", "▁Hi"]
    for piece in pieces:
        vocab[piece] = len(vocab)
    merges = [("▁", "{"), ("▁", "H"), ("▁H", "i")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_leading_space_token_is_allowed():
    tok = _sentencepiece_tokenizer()
    brace = tok.convert_tokens_to_ids("▁{")
    assert tok.tokenize("{a") == ["▁{", "a"]  # what follows "ASSISTANT:" naturally
    compiler = GrammarCompiler(tok, n_vocab=len(tok) + 13)  # logits wider than the vocabulary
    assert compiler.compile_schema({"type": "object"}).matcher().validate_tokens([brace]) == 1
    auto = compiler.compile_schema({"type": "object"}, allow_text=True).matcher()
    assert auto.validate_tokens([tok.convert_tokens_to_ids("▁Hi")]) == 1 and auto.validate_tokens([brace]) == 1
    # without the optional space the model would be pushed off its natural first token
    bare = compiler.compile('start: value\nvalue: %json {"type": "object"}')
    assert bare.matcher().validate_tokens([brace]) == 0


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"type": "string", "format": "foo"}, "Unknown format: foo"),
        ({"not": {"type": "string"}}, "Unimplemented keys"),
        ({"type": "string", "pattern": "(?=a)"}, "look-around"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "strin"}, "Invalid type"),
    ],
)
def test_unsupported_schema_raises_invalid_request(compiler, schema, reason):
    with pytest.raises(InvalidRequestError, match="cannot constrain the output to this schema") as info:
        compiler.compile_schema(schema)
    assert reason in str(info.value) and "start:" not in str(info.value)  # the reason, not the grammar dump


def test_pydantic_style_schema_compiles(compiler, tiny):
    schema = {
        "$defs": {"Unit": {"enum": ["C", "F"], "title": "Unit", "type": "string"}},
        "title": "Weather",
        "description": "Look up the weather // not a Lark comment # nor this }",
        "type": "object",
        "properties": {
            "city": {"title": "City", "type": "string", "maxLength": 20},
            "unit": {"$ref": "#/$defs/Unit", "default": "C"},
            "days": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 7}, {"type": "null"}], "default": None},
        },
        "required": ["city"],
    }
    # "#/$defs/..." refers to the root of the whole schema: nested in an envelope, a tool's
    # $defs must move to the envelope's root (as vLLM does), else the refs dangle
    with pytest.raises(InvalidRequestError, match="Pointer '/\\$defs/Unit' does not exist"):
        compiler.compile_schema(envelope("weather", schema))
    params = {k: v for k, v in schema.items() if k != "$defs"}
    m = compiler.compile_schema({**envelope("weather", params), "$defs": schema["$defs"]}).matcher()
    assert feeds(m, tokens(tiny.tokenizer, '{"name":"weather","arguments":{"city":"Oslo","unit":"F","days":null}}'))
    assert m.is_accepting()


# ---------------------------------------------------------------------------- compiler cache


def test_compile_is_cached(tiny):
    compiler = GrammarCompiler(tiny.tokenizer, n_vocab=tiny.n_vocab, eos_ids=tiny.eos_ids, max_cached=2)
    lltok = compiler.lltokenizer
    assert compiler.lltokenizer is lltok and compiler.tokenizer_seconds is not None
    text = lark_grammar(CALLS, allow_text=True)
    first = compiler.compile(text)
    again = compiler.compile(lark_grammar(CALLS, allow_text=True))  # equal text, new string
    # one compile, then a cache hit (how much faster that is: benchmarks/bench_grammar.py)
    assert again is first and (compiler.hits, compiler.misses) == (1, 1)
    assert first.matcher() is not first.matcher()  # fresh matchers, one compile
    # least recently used grammars leave a full cache
    compiler.compile_schema(ANSWER)
    compiler.compile_schema(CALL)
    assert compiler.cached == 2 and compiler.compile(text) is not first


def test_compile_and_matchers_on_caller_threads(compiler, tiny):
    """Requests are prepared on callers' threads; the worker thread then uses the matchers."""
    schemas = [ANSWER, CALL, CALLS, {"type": "object", "properties": {"n": {"type": "integer"}}}]
    made, errors = [None] * 16, []

    def prepare(i):
        try:
            made[i] = compiler.compile_schema(schemas[i % 4], allow_text=bool(i % 2)).matcher()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(m is not None for m in made)
    good = '{"name":"get_weather","arguments":{"city":"Rome"}}'
    assert feeds(made[1], tokens(tiny.tokenizer, good)) and made[1].is_accepting()


# ---------------------------------------------------------------------------- the processor


def _scores(batch, width, device="cpu"):
    return torch.randn((batch, width), generator=torch.Generator().manual_seed(7)).to(device)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_processor_masks_rows_exactly(compiler, tiny, device):
    tok = tiny.tokenizer
    grammar = compiler.compile_schema(CALL)
    width = tiny.n_vocab + 5  # logits may be wider than the grammar's vocabulary
    free_row = _scores(1, width, device)
    matchers = [grammar.matcher(), None, grammar.matcher()]
    proc = GrammarLogitsProcessor(matchers, n_vocab=tiny.n_vocab, eos_ids=tiny.eos_ids)
    prompt = torch.zeros((3, 4), dtype=torch.long, device=device)
    scores = _scores(3, width, device)
    scores[1] = free_row[0]
    out = proc(prompt, scores.clone())
    assert torch.equal(out[1], free_row[0])  # a free row is untouched
    allowed = set(torch.isfinite(out[0]).nonzero().flatten().tolist())
    assert allowed == {t for t in range(tiny.n_vocab) if grammar.matcher().validate_tokens([t])}
    assert allowed == {tokens(tok, " ")[0], tokens(tok, "{")[0]}
    # step 2: row 0 took "{", row 2 took a token its mask forbade (a pad): it is dropped,
    # never fed, and its scores are left alone from then on
    step = torch.cat([prompt, torch.tensor([[tokens(tok, "{")[0]], [5], [tiny.pad_id]], device=device)], 1)
    out = proc(step, scores.clone())
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == {tokens(tok, '"')[0]}
    assert torch.equal(out[2], scores[2]) and not matchers[2].is_error()
    assert proc.accepted(2) is False and proc.accepted(1) is None
    # feed the rest of a call: once complete only EOS may follow
    rest = tokens(tok, '"name":"get_weather","arguments":{"city":"X"}}')
    ids = step
    for t in rest:
        ids = torch.cat([ids, torch.tensor([[t], [5], [tiny.pad_id]], device=device)], 1)
        out = proc(ids, scores.clone())
    assert proc.accepted(0) is True and matchers[0].is_stopped()
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == set(tiny.eos_ids)
    assert proc.finish_row(0, [tokens(tok, "{")[0], *rest, min(tiny.eos_ids)]) is True


def test_dead_end_allows_only_eos(compiler, tiny):
    m = compiler.compile_schema(CALL).matcher()
    proc = compiler.processor([m])
    m.consume_token(tokens(tiny.tokenizer, "x")[0])  # corrupt it behind the processor's back
    assert m.is_error()
    out = proc(torch.zeros((1, 3), dtype=torch.long), _scores(1, tiny.n_vocab))
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == set(tiny.eos_ids)
    assert proc.accepted(0) is False


def test_processor_rejects_misuse(compiler, tiny):
    g = compiler.compile_schema(CALL)
    m = g.matcher()
    with pytest.raises(ValueError, match="own matcher"):
        compiler.processor([m, m])
    proc = compiler.processor([g.matcher(), None])
    with pytest.raises(ValueError, match="built for 2"):
        proc(torch.zeros((3, 2), dtype=torch.long), _scores(3, tiny.n_vocab))
    with pytest.raises(ValueError, match="columns"):
        proc(torch.zeros((2, 2), dtype=torch.long), _scores(2, tiny.n_vocab - 1))


def test_processor_resets_matchers_for_a_retry(compiler, tiny):
    m = compiler.compile_schema(CALL).matcher()
    assert feeds(m, tokens(tiny.tokenizer, '{"name"'))
    compiler.processor([m])
    assert feeds(m, tokens(tiny.tokenizer, '{"name":"get_weather"'))


# ---------------------------------------------------------------------------- generation


@pytest.mark.parametrize("schema", [ANSWER, CALL, CALLS], ids=["answer", "call", "calls"])
def test_sampled_output_always_matches_schema(tiny, compiler, schema):
    """(a) and (b): temperature 1, no top-k, 20 seeds: valid every time, within MAX_NEW."""
    grammar = compiler.compile_schema(schema)
    lengths = []
    for seed in SEEDS:
        [out], _ = run(tiny, compiler, [("Reply in JSON.", 1, grammar)], sample=True, seed=seed)
        assert_valid(out, schema)
        lengths.append(len(out.ids))
    assert max(lengths) < MAX_NEW


def test_auto_mode_gives_text_or_a_valid_call(tiny, compiler):
    """(c): on even seeds the model is nudged towards "{" at its first step (as a model
    that wants to call would be); the rest write text."""
    grammar = compiler.compile_schema(CALL, allow_text=True)
    brace = tokens(tiny.tokenizer, "{")[0]

    def nudge(input_ids, scores):
        if nudge.first:
            scores[:, brace] += 8.0
            nudge.first = False
        return scores

    kinds = []
    for seed in SEEDS:
        nudge.first = seed % 2 == 0
        [out], _ = run(tiny, compiler, [("Weather?", 0, grammar)], sample=True, seed=seed, extra_processors=[nudge])
        if out.text.lstrip().startswith(("{", "[")):
            assert_valid(out, CALL)
            kinds.append("call")
        else:
            assert out.text.strip()
            # text is complete wherever it stops, unless cut inside a multi-byte character
            assert out.accepted is True or (not out.ended and out.text.endswith("\ufffd")), out
            kinds.append("text")
    assert {"call", "text"} <= set(kinds), kinds


def test_mixed_batch_rows_match_solo_runs(tiny, compiler):
    """(d): constrained and free rows share a left-padded greedy batch; each row gets the
    tokens it gets alone, and a free row is exactly unconstrained generation."""
    rows = [
        ("Answer in JSON please.", 0, compiler.compile_schema(ANSWER)),
        ("Describe the picture in many words, at length.", 1, None),
        ("Call a tool.", 1, compiler.compile_schema(CALL)),
        ("Hi", 0, compiler.compile_schema(CALLS, allow_text=True)),
    ]
    batch, _ = run(tiny, compiler, rows, max_new=120)
    for i, row in enumerate(rows):
        [alone], _ = run(tiny, compiler, [row], max_new=120)
        assert batch[i].ids == alone.ids, i
    free, _ = run(tiny, compiler, [rows[1]], max_new=120)
    ids, pixels = prompt_ids(tiny, rows[1][0], 1)
    with torch.inference_mode():
        plain = tiny.model.generate(
            input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], pixel_values=pixels,
            max_new_tokens=120, do_sample=False, pad_token_id=tiny.pad_id,
        )  # fmt: skip
    assert free[0].ids == plain[0, len(ids) :].tolist()[: len(free[0].ids)]
    assert_valid(batch[0], ANSWER)
    assert_valid(batch[2], CALL)
    assert batch[3].accepted is True


def test_row_ended_early_does_not_break_the_others(tiny, compiler):
    """(e): a stopping criterion ends row 0 mid-call (cancel, stop string, max tokens);
    generate pads that row from then on; the other rows carry on as if alone."""
    rows = [
        ("Call a tool.", 0, compiler.compile_schema(CALL)),
        ("Answer in JSON please.", 0, compiler.compile_schema(ANSWER)),
        ("Call a tool now.", 1, compiler.compile_schema(CALL)),
    ]

    def silent_end(input_ids, scores=None, **kwargs):
        """Ends row 0 after 5 new tokens without telling the processor."""
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[0] = input_ids.shape[1] - silent_end.prompt >= 5
        return done

    silent_end.prompt = max(len(prompt_ids(tiny, text, n)[0]) for text, n, _ in rows)
    for sample, told in ((False, True), (True, True), (False, False), (True, False)):
        if told:  # the row tracker ends the row and calls finish_row
            outs, proc = run(tiny, compiler, rows, sample=sample, seed=3, limits=[5, MAX_NEW, MAX_NEW])
            assert len(outs[0].ids) == 5
        else:  # the processor itself must notice the pads generate writes into the row
            outs, proc = run(tiny, compiler, rows, sample=sample, seed=3, criteria=[silent_end])
            assert len(outs[0].ids) > 5 and set(outs[0].ids[5:]) == {tiny.pad_id}
        assert outs[0].accepted is False and proc.calls > 6
        assert not proc.matchers[0].is_error()  # the pads were never fed to it
        assert_valid(outs[1], ANSWER)
        assert_valid(outs[2], CALL)
        if not sample:
            for i in (1, 2):
                [alone], _ = run(tiny, compiler, [rows[i]])
                assert outs[i].ids == alone.ids


def test_truncated_call_is_not_accepted(tiny, compiler):
    """The grammar guarantees a valid prefix, not completion: a call cut by max tokens is
    reported as incomplete so the backend can mark it invalid."""
    [out], _ = run(tiny, compiler, [("Call.", 0, compiler.compile_schema(CALL))], max_new=12)
    assert len(out.ids) == 12 and out.accepted is False and not out.ended
    with pytest.raises(ValueError):
        json.loads(out.text)
