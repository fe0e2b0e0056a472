"""Property tests (hypothesis) of the prompt renderer and the two message translators.

Renderer: any mix of text and image parts in any roles renders with exactly one placeholder
per image, each exactly where its image part stands (checked against a shadow rendering in
which every image is replaced by a unique token), the images listed in placeholder order;
user text can never add a placeholder or end a turn, whatever it contains (``<image>``,
``</s>``, template words, unicode); the only failures are our typed errors, for the two
documented reasons. Translators: random LangChain / LlamaIndex messages of text and image
blocks (every image form) in random roles become one turn per message with the parts in
order, or raise our typed error for the one thing Mantis refuses (images from the assistant)."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock

from mantis_llm import Conversation, Image, Turn
from mantis_llm.errors import InvalidRequestError, MantisError
from mantis_llm.langchain import to_conversation as messages_to_conversation
from mantis_llm.llama_index import to_conversation
from mantis_llm.prompt import IMAGE_TOKEN, SEP, render

from .conftest import png

# the conversations put system messages anywhere; that Mantis moves them up is tested in core
pytestmark = pytest.mark.filterwarnings("ignore::mantis_llm.prompt.MidConversationSystemWarning")

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PNG = png(8, 8)
PNG_B64 = base64.b64encode(PNG).decode()
IMG = object()  # marker: an image part goes here
TOKEN = "\x01{}\x01"  # shadow stand-in for image k (the text strategy never makes \x01)

tricky = st.sampled_from(
    ["<image>", "</s>", "<s>", "<Image>", "</Image>", "<image", "image>", "<", ">", "USER:", "ASSISTANT:",
     "(image 1: <Image><image></Image>)", "<<image>>", "<im<image>age>", "\n", " ", "", "é", "🙂", "\u200b", "\x00", "\t"]
)  # fmt: skip
texts = st.lists(st.one_of(tricky, st.text(st.characters(blacklist_characters="\x01"), max_size=12)), max_size=4).map(
    "".join
)
roles = st.sampled_from(["system", "user", "assistant"])
turns_st = st.lists(st.tuples(roles, st.lists(st.one_of(texts, st.just(IMG)), max_size=5)), max_size=6)


def build(spec, image_for) -> Conversation:
    """A conversation from (role, [text | IMG]) pairs; ``image_for(k)`` makes the k-th image (turn order)."""
    k = 0
    turns = []
    for role, parts in spec:
        out = []
        for p in parts:
            if p is IMG:
                out.append(image_for(k))
                k += 1
            else:
                out.append(p)
        turns.append(Turn(role, out))
    return Conversation(turns)


def placeholder_pattern(mode: str) -> str:
    return r"\(image \d+: <Image><image></Image>\)" if mode == "local" else re.escape(IMAGE_TOKEN)


@FUZZ
@given(spec=turns_st)
def test_render_places_one_placeholder_per_image_where_it_stands(spec):
    images = {}
    conv = build(spec, lambda k: images.setdefault(k, Image(f"https://img.test/{k}.png")))
    shadow = build(spec, lambda k: TOKEN.format(k))
    # images in prompt order: system turns come first (render puts them first)
    in_turns = [img for t in conv.turns for img in t.images]
    expected = [i for t in conv.turns if t.role == "system" for i in t.images] + [
        i for t in conv.turns if t.role != "system" for i in t.images
    ]
    for mode in ("local", "fal"):
        try:
            real = render(conv, mode)
        except InvalidRequestError as exc:
            has_user = any(t.role == "user" for t in conv.turns)
            user_content = any(
                isinstance(p, Image) or (isinstance(p, str) and p.strip())
                for t in conv.turns
                if t.role == "user"
                for p in t.parts
            )
            assert (not has_user and "no user message" in exc.message) or (
                has_user and not user_content and "prompt is empty" in exc.message
            ), exc.message
            continue
        shadow_text = render(shadow, mode).text
        # exactly one placeholder per image, and no other: user text cannot add one
        assert real.text.count(IMAGE_TOKEN) == len(in_turns) == len(real.images)
        assert [id(i) for i in real.images] == [id(i) for i in expected]
        # each placeholder stands exactly where its image part was (the shadow's token k)
        pieces = re.split(placeholder_pattern(mode), real.text)
        shadow_pieces = re.split("\x01\\d+\x01", shadow_text)
        assert pieces == shadow_pieces
        order = [int(k) for k in re.findall("\x01(\\d+)\x01", shadow_text)]
        assert [id(images[k]) for k in order] == [id(i) for i in real.images]
        if mode == "local":
            assert [int(n) for n in re.findall(r"\(image (\d+): <Image><image></Image>\)", real.text)] == list(
                range(1, len(expected) + 1)
            )
        # user text cannot end a turn: every </s> is one of the template's separators
        dialogue = [t for t in conv.turns if t.role != "system"]
        if mode == "local":
            prefill = dialogue[-1].role == "assistant"
            assert real.text.count(SEP) == 1 + len(dialogue) - prefill
        else:
            assert real.text.count(SEP) == len(dialogue) - 1


# ----------------------------------------------------------------------------- LangChain

URLS = st.integers(0, 99).map(lambda k: f"https://img.test/{k}.jpg")


@st.composite
def lc_image(draw):
    url = draw(URLS)
    form = draw(st.sampled_from(["v1-url", "openai", "openai-bare", "legacy-url", "base64", "data-uri"]))
    if form == "v1-url":
        return {"type": "image", "url": url}, ("url", url)
    if form == "openai":
        return {"type": "image_url", "image_url": {"url": url}}, ("url", url)
    if form == "openai-bare":
        return {"type": "image_url", "image_url": url}, ("url", url)
    if form == "legacy-url":
        return {"type": "image", "source_type": "url", "url": url}, ("url", url)
    if form == "base64":
        return {"type": "image", "base64": PNG_B64, "mime_type": "image/png"}, ("bytes", PNG)
    uri = "data:image/png;base64," + PNG_B64
    return {"type": "image_url", "image_url": {"url": uri}}, ("url", uri)


lc_text = texts.map(lambda t: ({"type": "text", "text": t}, ("text", t)))
lc_messages = st.lists(
    st.tuples(st.sampled_from(["system", "human", "ai", "tool"]), st.lists(st.one_of(lc_text, lc_image()), max_size=4)),
    max_size=5,
)


def lc_message(kind: str, blocks: list):
    if kind == "system":
        return SystemMessage(content=blocks)
    if kind == "human":
        return HumanMessage(content=blocks)
    if kind == "ai":
        return AIMessage(content=blocks)
    return ToolMessage(content=blocks, tool_call_id="call-1", name="lookup")


def image_matches(img: Image, want: tuple) -> bool:
    """``img`` is the wanted URL, or holds the wanted bytes (data URIs may arrive as either)."""
    kind, value = want
    if kind == "url" and not value.startswith("data:"):
        return img.url == value
    return img.data == (value if kind == "bytes" else base64.b64decode(value.partition(",")[2]))


@FUZZ
@given(spec=lc_messages)
def test_langchain_messages_translate_in_order(spec):
    messages = [lc_message(kind, [b for b, _ in blocks]) for kind, blocks in spec]
    bad = [(i, j) for i, (kind, blocks) in enumerate(spec, 1) if kind == "ai"
           for j, (_, want) in enumerate(blocks, 1) if want[0] != "text"]  # fmt: skip
    try:
        conv = messages_to_conversation(messages)
    except InvalidRequestError as exc:
        assert bad, exc.message
        assert exc.message.startswith(f"message {bad[0][0]}, block ")
        return
    assert not bad
    assert len(conv.turns) == len(spec)
    for turn, (kind, blocks) in zip(conv.turns, spec):
        assert turn.role == {"system": "system", "human": "user", "ai": "assistant", "tool": "user"}[kind]
        parts = list(turn.parts)
        if kind == "tool":
            assert parts.pop(0).startswith('Tool result (tool "lookup"')
        want = [w for _, w in blocks if w[0] != "text" or w[1]]  # empty text blocks are dropped
        if kind == "tool":  # and blank text of a tool result too
            want = [w for w in want if w[0] != "text" or w[1].strip()]
        assert len(parts) == len(want)
        for part, w in zip(parts, want):
            if w[0] == "text":
                assert part == w[1]
            else:
                assert isinstance(part, Image) and image_matches(part, w)
    check_renders(conv)


def check_renders(conv: Conversation) -> None:
    n = len(conv.images)
    for mode in ("local", "fal"):
        try:
            out = render(conv, mode)
        except MantisError as exc:
            assert isinstance(exc, InvalidRequestError)
            continue
        assert out.text.count(IMAGE_TOKEN) == n == len(out.images)


# ----------------------------------------------------------------------------- LlamaIndex

li_image = st.one_of(
    URLS.map(lambda u: (ImageBlock(url=u), ("url", u))),
    st.just(0).map(lambda _: (ImageBlock(image=PNG, image_mimetype="image/png"), ("bytes", PNG))),
)
li_text = texts.map(lambda t: (TextBlock(text=t), ("text", t)))
li_messages = st.lists(
    st.tuples(st.sampled_from(list(MessageRole)), st.lists(st.one_of(li_text, li_image), max_size=4)), max_size=5
)
LI_ROLES = {
    MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "system", MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant", MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "user", MessageRole.FUNCTION: "user",
}  # fmt: skip


@FUZZ
@given(spec=li_messages)
def test_llama_index_messages_translate_in_order(spec):
    messages = [ChatMessage(role=role, blocks=[b for b, _ in blocks]) for role, blocks in spec]
    conv = to_conversation(messages)
    assert len(conv.turns) == len(spec)
    for turn, (role, blocks) in zip(conv.turns, spec):
        assert turn.role == LI_ROLES[role]
        parts = list(turn.parts)
        if role in (MessageRole.TOOL, MessageRole.FUNCTION):
            assert parts.pop(0).startswith("Tool result")
            # a tool result keeps its text and images in order; blank text is left out
            blocks = [(b, w) for b, w in blocks if w[0] != "text" or w[1].strip()]
        assert len(parts) == len(blocks)
        for part, (_, w) in zip(parts, blocks):
            if w[0] == "text":
                assert part == w[1]
            else:
                assert isinstance(part, Image) and image_matches(part, w)
    check_renders(conv)
