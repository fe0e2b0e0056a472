"""Render a :class:`~mantis_llm.types.Conversation` into Mantis's prompt.

Mantis-llava-7b was trained with the Vicuna template ``conv_mllava_v1``::

    {system}</s>USER: {text}</s>ASSISTANT: {answer}</s>USER: {text}</s>ASSISTANT:

and each image written as ``(image j: <Image><image></Image>)`` where the image part stands
(j counts from 1 over the whole conversation). Two modes:

``"local"``
    The whole prompt, as the local model must see it.
``"fal"``
    What the fal endpoint's ``prompt`` field takes: fal wraps it in the template itself and
    wraps each ``<image>`` itself, so we send plain ``<image>`` placeholders. Earlier turns
    are joined with the template's own separators, so that once fal adds its wrapper the
    model sees the same multi-turn layout as locally. A user's system message cannot
    replace fal's system sentence; it is put first in the prompt instead.

Text a user typed that looks like a placeholder or a separator (``<image>``, ``<s>``,
``</s>``) is escaped (``<image>`` becomes ``< image>``), so it can never take an image slot
or end a turn.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Literal

from .errors import InvalidRequestError
from .types import Conversation, Image, Part

DEFAULT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_TOKEN = "<image>"
SEP = "</s>"
ROLE_NAMES = {"user": "USER", "assistant": "ASSISTANT"}
_RESERVED = re.compile(r"<(/?s|image)>")

Mode = Literal["local", "fal"]


class MidConversationSystemWarning(UserWarning):
    """A system message came after the dialogue began; Mantis reads it at the top instead."""


@dataclass(frozen=True)
class RenderedPrompt:
    """The prompt text and the images, in the order of their placeholders.

    ``labels[k]`` names ``images[k]`` for error messages: ``"image {i} of message {m}"``,
    ``i`` counting images within the message and ``m`` the 1-based index of its turn in
    ``conversation.turns`` (system turns are rendered first, so their images come first).
    """

    text: str
    images: list[Image]
    labels: list[str] = field(default_factory=list)

    @property
    def labeled_images(self) -> list[tuple[str, Image]]:
        return list(zip(self.labels, self.images, strict=True))


def escape_text(text: str) -> str:
    """Make user text unable to act as an image slot or turn separator."""
    return _RESERVED.sub(lambda m: "< " + m.group(1) + ">", text)


def _join(pieces: list[str]) -> str:
    """Concatenate parts, adding one space where two non-blank pieces would touch."""
    out = ""
    for piece in pieces:
        if out and piece and not out[-1].isspace() and not piece[0].isspace():
            out += " "
        out += piece
    return out


def render(conversation: Conversation, mode: Mode = "local") -> RenderedPrompt:
    """Render ``conversation`` for the ``"local"`` model or the ``"fal"`` endpoint."""
    if mode not in ("local", "fal"):
        raise ValueError(f"mode must be 'local' or 'fal', not {mode!r}")
    turns = list(conversation.turns)
    if not any(t.role == "user" for t in turns):
        raise InvalidRequestError("the conversation has no user message")

    images: list[Image] = []
    labels: list[str] = []

    def content(m: int, parts: list[Part]) -> str:
        pieces, in_turn = [], 0
        for part in parts:
            if isinstance(part, Image):
                in_turn += 1
                images.append(part)
                labels.append(f"image {in_turn} of message {m}")
                pieces.append(
                    f"(image {len(images)}: <Image>{IMAGE_TOKEN}</Image>)" if mode == "local" else IMAGE_TOKEN
                )
            else:
                pieces.append(escape_text(part))
        return _join(pieces).strip()

    numbered = list(enumerate(turns, 1))
    first_dialogue = next(i for i, t in enumerate(turns) if t.role != "system")  # a user turn exists
    if any(t.role == "system" for t in turns[first_dialogue:]):
        warnings.warn(
            "a system message after the conversation's first user or assistant message is moved to the "
            "top: Mantis's prompt has one system text, before the dialogue (put the instruction in a "
            "user message to keep it in place)",
            MidConversationSystemWarning,
            stacklevel=2,
        )
    system_parts = [content(m, t.parts) for m, t in numbered if t.role == "system"]
    system = "\n".join(s for s in system_parts if s)
    dialogue = [(t.role, content(m, t.parts)) for m, t in numbered if t.role != "system"]
    if not any(text for role, text in dialogue if role == "user"):
        raise InvalidRequestError("the prompt is empty: the user messages have no text and no images")

    if mode == "local":
        # A trailing assistant turn is a prefix for the model to continue.
        prefill = dialogue.pop()[1] if dialogue[-1][0] == "assistant" else None
        text = (system or DEFAULT_SYSTEM) + SEP + "".join(_turn(r, t) for r, t in dialogue) + "ASSISTANT:"
        if prefill:
            text += " " + prefill
    else:
        # fal writes "{its system}</s>USER: " before our prompt and "</s>ASSISTANT:" after it.
        body = "".join(_turn(r, t) for r, t in dialogue)[: -len(SEP)]
        body = body.removeprefix("USER: ")
        text = f"{system}\n\n{body}" if system else body
    return RenderedPrompt(text=text, images=images, labels=labels)


def _turn(role: str, text: str) -> str:
    return f"{ROLE_NAMES[role]}: {text}{SEP}"


def labeled_images(conversation: Conversation) -> list[tuple[str, Image]]:
    """Every image of ``conversation`` with its label, in prompt order (see :class:`RenderedPrompt`)."""
    return render(conversation).labeled_images
