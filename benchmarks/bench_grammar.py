"""Benchmark of grammar-constrained decoding (llguidance) for the local backend.

    python benchmarks/bench_grammar.py [--model DIR] [--device cpu|cuda] [--rounds 10] [--samples 40] [--threads N]

By default it runs on the tiny random-weight test Mantis (built in a temp dir; byte-level
tokenizer, 261 tokens); ``--model`` takes any local LLaVA Mantis checkpoint instead. It
measures:

(a) the one-off ``LLTokenizer`` build, for the model's tokenizer and for a 32k
    Vicuna-style tokenizer (byte-fallback "▁" BPE, trained here on the stdlib's sources,
    since no real one can be downloaded);
(b) grammar compile time per schema, first and cached, and the cost of a fresh matcher;
(c) per-token cost of constrained against free decoding: pairs of sampled runs (same
    prompt, same seed, alternating), the free run asked for as many tokens as the
    constrained one produced; the figure is the median of the per-pair ratios (goal:
    at most 1.15x). Also the processor's own time per step, measured inside it: that is
    what it adds next to a 7B forward pass (tens of ms per step on a GPU);
(d) the processor alone at Mantis-llava-7b's width (32064 logits, the 32k tokenizer),
    teacher-forced through a tool call, batch 1 and 8: llguidance (advance + mask) and
    the torch masking, per step;
(e) the share of valid structured answers (``json.loads`` + ``jsonschema``) with and
    without the grammar, sampled at temperature 1.

Prints the figures and a Markdown block for benchmarks/RESULTS.md. The tiny model's
forward pass takes well under a millisecond, so ratio (c) is a worst case; the absolute
microseconds are what carry over to the real model.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

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


def envelope(name: str, params: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


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
CALL = envelope("get_weather", WEATHER)
CALLS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 2,
    "items": {"anyOf": [envelope("get_weather", WEATHER), envelope("get_time", TIME)]},
}
# name -> (schema, allow_text, prompt, an example answer in the grammar's compact form)
CASES = {
    "answer": (ANSWER, False, "How do you feel? Reply with only JSON", '{"answer":"fine","mood":"happy","ok":true}'),
    "call": (CALL, False, "Weather in Paris? Call the tool", '{"name":"get_weather","arguments":{"city":"Paris"}}'),
    "calls (2 tools, list)": (
        CALLS,
        False,
        "Weather and time in Oslo? Call the tools",
        '[{"name":"get_weather","arguments":{"city":"Oslo"}},{"name":"get_time","arguments":{"zone":"CET","hours":9}}]',
    ),
    "auto (text or call)": (CALL, True, "Weather in Paris?", '{"name":"get_weather","arguments":{"city":"Paris"}}'),
    "any object": (None, False, "Reply with a JSON object", '{"a":1}'),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        pass
    import llguidance
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"llguidance {llguidance.__version__}, Python {platform.python_version()}"
    )


def load(path, device: str):
    """Model and processor, loaded the way the local backend loads them."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration, LlavaProcessor

    config = AutoConfig.from_pretrained(path)
    vision = config.vision_config
    processor = LlavaProcessor.from_pretrained(
        path,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if vision.model_type.startswith("clip") else 0,
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype).to(device).eval()
    return model, processor


def vicuna_style_tokenizer(vocab_size: int = 32000):
    """A byte-fallback "▁" BPE of Llama-2/Vicuna's shape, trained on the stdlib's sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts, size = [], 0
    for name in sorted(glob.glob(os.path.join(os.path.dirname(json.__path__[0]), "**", "*.py"), recursive=True)):
        try:
            with open(name, encoding="utf-8") as fh:
                texts.append(fh.read())
        except (OSError, UnicodeDecodeError):
            continue
        size += len(texts[-1])
        if size > 12_000_000:
            break
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False, limit_alphabet=200
    )
    trained.train_from_iterator(texts, trainer)
    learned = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})  # ids 3..258, as in Llama
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class Runner:
    """Left-padded batches through ``model.generate``, as the local backend runs them."""

    def __init__(self, model, processor, compiler, device: str) -> None:
        import torch

        self.torch, self.model, self.processor, self.compiler, self.device = torch, model, processor, compiler, device
        self.tok = processor.tokenizer
        self.eos = sorted(compiler.eos_ids)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos[0]

    def inputs(self, prompts: list[str], image: bool = True):
        from PIL import Image as PILImage

        from mantis_llm.testing import make_image_bytes

        torch = self.torch
        encoded, pixels = [], []
        for i, text in enumerate(prompts):
            images = [PILImage.open(io.BytesIO(make_image_bytes(64 + 8 * i, 48))).convert("RGB")] if image else []
            wrapper = "(image 1: <Image><image></Image>) " if image else ""
            enc = self.processor(
                text=[f"{SYSTEM}</s>USER: {wrapper}{text}</s>ASSISTANT:"], images=images or None, return_tensors="pt"
            )
            encoded.append(enc["input_ids"][0])
            if image:
                pixels.append(enc["pixel_values"])
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids) :] = ids
            attention[i, width - len(ids) :] = 1
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device)}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
        return batch, width

    def generate(self, batch, width, grammars, *, seed: int, max_new: int):
        """Returns (seconds, per-row new ids cut at EOS, processor or None)."""
        torch = self.torch
        processor = None
        kwargs = {}
        if any(g is not None for g in grammars):
            processor = self.compiler.processor([None if g is None else g.matcher() for g in grammars])
            kwargs["logits_processor"] = [processor]
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sync()
            started = time.perf_counter()
            out = self.model.generate(
                **batch, max_new_tokens=max_new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                pad_token_id=self.pad, eos_token_id=self.eos, **kwargs,
            )  # fmt: skip
            sync()
            seconds = time.perf_counter() - started
        rows = []
        for i, ids in enumerate(out[:, width:].tolist()):
            end = next((k + 1 for k, t in enumerate(ids) if t in self.eos), len(ids))
            rows.append(ids[:end])
            if processor is not None:
                processor.finish_row(i, ids[:end])
        return seconds, rows, processor


def valid(text: str, schema: dict | None) -> bool:
    import jsonschema

    try:
        value = json.loads(text.strip())
        jsonschema.validate(value, schema or {"type": "object"})
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local Mantis checkpoint (default: the tiny random test model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=10, help="pairs per case for (c)")
    parser.add_argument("--samples", type=int, default=40, help="sampled answers per case for (e)")
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--no-32k", action="store_true", help="skip training the 32k tokenizer ((a) and (d))")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)

    from mantis_llm.backends.local.grammar import GrammarCompiler, lark_grammar
    from mantis_llm.testing import build_tiny_mantis

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"machine: {machine()}")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_tiny_mantis(Path(tmp) / "clip")
        model, processor = load(path, args.device)
    tok = processor.tokenizer
    n_vocab = model.get_output_embeddings().weight.shape[0]  # the logits width
    eos = {tok.eos_token_id, *([model.generation_config.eos_token_id] if model.generation_config.eos_token_id else [])}
    eos_ids = sorted(int(e) for e in eos if e is not None)
    print(f"model: {args.model or 'tiny random Mantis'}, vocabulary {len(tok)}, logits {n_vocab}, eos {eos_ids}")
    figures: dict[str, str] = {}

    # (a) LLTokenizer build ------------------------------------------------------------
    def build(tokenizer, width):
        GrammarCompiler(tokenizer, n_vocab=width).lltokenizer  # noqa: B018  (builds it)

    t_tok = median_time(lambda: build(tok, n_vocab), 3)
    print(f"(a) LLTokenizer build, model tokenizer ({len(tok)} tokens): {t_tok * 1000:.1f} ms")
    big = None
    if not args.no_32k:
        started = time.perf_counter()
        big = vicuna_style_tokenizer()
        print(f"    (trained a {len(big)}-token Vicuna-style tokenizer in {time.perf_counter() - started:.1f} s)")
        t_big = median_time(lambda: build(big, 32064), 3)
        print(f"(a) LLTokenizer build, 32k byte-fallback tokenizer (n_vocab 32064): {t_big * 1000:.0f} ms")
        figures["tokenizer"] = f"{t_tok * 1000:.1f} ms (tiny) / {t_big * 1000:.0f} ms (32k)"
    else:
        figures["tokenizer"] = f"{t_tok * 1000:.1f} ms (tiny)"

    # (b) compile, first and cached ----------------------------------------------------
    # One compiler per tokenizer, as the backend keeps one per model. "first" compiles a
    # schema the compiler has not seen (each of 5 variants differs in its description);
    # the very first compile after the LLTokenizer build pays a one-off extra, shown apart.
    compilers = {"model": (tok, n_vocab)}
    if big is not None:
        compilers["32k"] = (big, 32064)
    compile_rows = []
    for label, (tokenizer, width) in compilers.items():
        shared = GrammarCompiler(tokenizer, n_vocab=width)
        shared.lltokenizer  # noqa: B018  (built in (a); not part of compile time)
        started = time.perf_counter()
        shared.compile_schema({"type": "string"})
        once = time.perf_counter() - started
        print(f"(b) [{label}] very first compile after the tokenizer build: {once * 1e3:.2f} ms")
        for name, (schema, allow_text, _, _) in CASES.items():
            firsts, cached, copies = [], [], []
            for k in range(5):
                variant = {**(schema or {"type": "object"}), "description": f"variant {k}"}
                text = lark_grammar(variant, allow_text=allow_text)
                started = time.perf_counter()
                grammar = shared.compile(text)
                firsts.append(time.perf_counter() - started)
                cached.append(median_time(lambda c=shared, text=text: c.compile(text), 50))
                copies.append(median_time(grammar.matcher, 50))
            first, hit, copy = statistics.median(firsts), statistics.median(cached), statistics.median(copies)
            compile_rows.append((label, name, first, hit))
            print(
                f"(b) compile [{label}] {name}: first {first * 1000:.2f} ms, cached {hit * 1e6:.1f} µs "
                f"({first / hit:.0f}x), new matcher {copy * 1e6:.1f} µs"
            )
    worst = max(compile_rows, key=lambda r: r[2])
    figures["compile"] = (
        f"{min(r[2] for r in compile_rows) * 1000:.1f}-{worst[2] * 1000:.1f} ms first, "
        f"{max(r[3] for r in compile_rows) * 1e6:.1f} µs cached"
    )

    compiler = GrammarCompiler(tok, n_vocab=n_vocab, eos_ids=eos_ids)
    runner = Runner(model, processor, compiler, args.device)

    # (c) constrained vs free decoding, per token ---------------------------------------
    per_token: dict[str, float] = {}
    for batch_size in (1, 4):
        for name in ("answer", "call"):
            schema, allow_text, prompt, example = CASES[name]
            grammar = compiler.compile_schema(schema, allow_text=allow_text)
            prompts = [f"{prompt} like {example}. Request {i}." for i in range(batch_size)]
            batch, width = runner.inputs(prompts)
            runner.generate(batch, width, [grammar] * batch_size, seed=0, max_new=8)  # warm up both paths
            runner.generate(batch, width, [None] * batch_size, seed=0, max_new=8)
            # constrained answers end when their JSON closes: first find each seed's length,
            # then time pairs of equal length, alternating which of the two goes first
            grammars, free = [grammar] * batch_size, [None] * batch_size
            lengths = [
                max(map(len, runner.generate(batch, width, grammars, seed=r, max_new=args.max_tokens)[1]))
                for r in range(args.rounds)
            ]
            ratios, proc_us, model_us = [], [], []
            for r in range(args.rounds):
                runs = {}
                for constrained in (True, False) if r % 2 == 0 else (False, True):
                    runs[constrained] = runner.generate(
                        batch, width, grammars if constrained else free, seed=r, max_new=lengths[r]
                    )
                (t_c, rows_c, proc), (t_f, rows_f, _) = runs[True], runs[False]
                steps_c, steps_f = max(map(len, rows_c)), max(map(len, rows_f))
                ratios.append((t_c / steps_c) / (t_f / steps_f))
                proc_us.append(proc.seconds / proc.calls * 1e6)
                model_us.append(t_f / steps_f * 1e6)
            steps_all = lengths
            ratio = statistics.median(ratios)
            per_token[f"{name} b{batch_size}"] = ratio
            print(
                f"(c) {name}, batch {batch_size}: {statistics.median(steps_all):.0f} steps, free "
                f"{statistics.median(model_us):.0f} µs/step, processor {statistics.median(proc_us):.0f} µs/step "
                f"({statistics.median(proc_us) / batch_size:.0f} µs per row) -> constrained/free per token "
                f"{ratio:.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f})"
            )

    # (d) the processor at Mantis's width, teacher-forced ------------------------------
    if big is not None:
        big_compiler = GrammarCompiler(big, n_vocab=32064, eos_ids=[big.eos_token_id])
        grammar = big_compiler.compile_schema(CALL)
        call = ' {"name":"get_weather","arguments":{"city":"San Francisco"}}'
        forced = big.encode(call, add_special_tokens=False)
        # (the trained vocabulary even has a '▁{"name":' token: tokens may span JSON lexemes)
        print(f"    forced call: {big.convert_ids_to_tokens(forced)}")
        for batch_size in (1, 8):
            fills, masks, totals = [], [], []
            for _ in range(max(3, args.rounds // 2)):
                proc = big_compiler.processor([grammar.matcher() for _ in range(batch_size)])
                mask_time = [0.0]
                inner = proc._mask

                def timed_mask(scores, rows, inner=inner, mask_time=mask_time):
                    started = time.perf_counter()
                    inner(scores, rows)
                    mask_time[0] += time.perf_counter() - started

                proc._mask = timed_mask  # type: ignore[method-assign]
                ids = torch.zeros((batch_size, 8), dtype=torch.long, device=args.device)
                base = torch.randn((batch_size, 32064), device=args.device)
                for step in range(len(forced) + 1):
                    proc(ids, base.clone())
                    if step < len(forced):
                        column = torch.full((batch_size, 1), forced[step], dtype=torch.long, device=args.device)
                        ids = torch.cat([ids, column], 1)
                assert all(proc.finish_row(i, forced) for i in range(batch_size))
                totals.append(proc.seconds / proc.calls)
                masks.append(mask_time[0] / proc.calls)
                fills.append(totals[-1] - masks[-1])
            total, mask = statistics.median(totals), statistics.median(masks)
            print(
                f"(d) processor, 32064 logits, {len(forced)}-token call, batch {batch_size}: "
                f"{total * 1e6:.0f} µs/step = llguidance {(total - mask) * 1e6:.0f} + torch mask {mask * 1e6:.0f} "
                f"({total / batch_size * 1e6:.0f} µs per row)"
            )
            figures[f"proc32k b{batch_size}"] = f"{total * 1e6:.0f} µs/step"

    # (e) share of valid structured answers --------------------------------------------
    shares = {}
    for name in ("answer", "call", "calls (2 tools, list)"):
        schema, allow_text, prompt, example = CASES[name]
        grammar = compiler.compile_schema(schema, allow_text=allow_text)
        batch, width = runner.inputs([f"{prompt} like {example}."])
        counts = {False: 0, True: 0}
        for seed in range(args.samples):
            for constrained in (False, True):
                _, [ids], proc = runner.generate(
                    batch, width, [grammar if constrained else None], seed=seed, max_new=args.max_tokens
                )
                text = tok.decode(ids, skip_special_tokens=True)
                ok = valid(text, schema) and (not constrained or proc.accepted(0) is True)
                counts[constrained] += ok
        shares[name] = (counts[False] / args.samples, counts[True] / args.samples)
        print(
            f"(e) {name}: valid without grammar {counts[False]}/{args.samples}, "
            f"with grammar {counts[True]}/{args.samples}"
        )

    print()
    print(
        f"| {date.today().isoformat()} | {args.model or 'tiny random Mantis'} ({args.device}) | "
        f"constrained/free per token: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in per_token.items())
        + f" | LLTokenizer {figures['tokenizer']} | compile {figures['compile']} | "
        + (
            f"processor at 32064 logits: {figures.get('proc32k b1', '-')} (batch 1), "
            f"{figures.get('proc32k b8', '-')} (batch 8) | "
        )
        + "valid without/with grammar: "
        + ", ".join(f"{k} {a:.0%}/{b:.0%}" for k, (a, b) in shares.items())
        + " |"
    )


if __name__ == "__main__":
    main()
