"""Token counting the Mantis way, offline: ChatMantis's get_num_tokens(_from_messages) (which
trim_messages calls) and the LlamaIndex context window. Nothing may reach a network: LangChain's
fallback (GPT-2 from the Hub) took 235 s of retries offline and then counted 0, and images 0."""

from __future__ import annotations

import socket

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages

from mantis_llm import Conversation, GenerationParams, Request
from mantis_llm.langchain import ChatMantis, image_block, to_conversation
from mantis_llm.testing import make_image_bytes

IMAGE = image_block(make_image_bytes(64, 48))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("token counting tried to open a connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_text_and_images_are_counted_without_a_tokenizer_download(monkeypatch):
    monkeypatch.setenv("FAL_KEY", "k")
    chat = ChatMantis()
    assert 2 <= chat.get_num_tokens("What is in the picture?") <= 10
    one = chat.get_num_tokens_from_messages([HumanMessage(content=[IMAGE, "What is it?"])])
    two = chat.get_num_tokens_from_messages([HumanMessage(content=[IMAGE, IMAGE, "What is it?"])])
    assert two - one >= 576  # Mantis-llava-7b: 576 tokens per image (plus its wrapper)
    assert chat.profile["max_input_tokens"] == 4096


def test_trim_messages_trims_by_mantis_tokens(monkeypatch):
    monkeypatch.setenv("FAL_KEY", "k")
    chat = ChatMantis()
    history = [SystemMessage("Be brief.")]
    for i in range(6):  # six turns with an image each: about 3,600 tokens of images alone
        history += [HumanMessage(content=[IMAGE, f"Picture {i}?"]), AIMessage(f"Answer {i}.")]
    history.append(HumanMessage(content=[IMAGE, "And the last one?"]))
    kept = trim_messages(history, max_tokens=2000, token_counter=chat, strategy="last", include_system=True)
    assert 1 < len(kept) < len(history) and isinstance(kept[0], SystemMessage)
    assert chat.get_num_tokens_from_messages(kept) <= 2000


def test_tools_are_counted_with_their_instruction(monkeypatch):
    from langchain_core.tools import tool

    @tool
    def zoom(factor: int) -> str:
        """Zoom into the picture."""
        return "ok"

    monkeypatch.setenv("FAL_KEY", "k")
    chat = ChatMantis()
    messages = [HumanMessage(content=[IMAGE, "Zoom in twice."])]
    assert chat.get_num_tokens_from_messages(messages, tools=[zoom]) > chat.get_num_tokens_from_messages(messages) + 20


def test_exact_with_the_local_model(local_backend):
    # the loaded tiny model's own tokenizer and its 16 tokens per image: the count the
    # backend reports as usage for the same messages
    chat = ChatMantis(backend=local_backend, max_tokens=2)
    messages = [SystemMessage("Be brief."), HumanMessage(content=[IMAGE, "What is it?", IMAGE])]
    used = local_backend.generate(Request(to_conversation(messages), GenerationParams(max_tokens=2))).usage
    assert chat.get_num_tokens_from_messages(messages) == used.input_tokens
    assert chat.get_token_ids("abc") == local_backend.processor.tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert chat.profile["max_input_tokens"] == local_backend.context_length == 512


def test_llama_index_context_window_from_the_loaded_model(local_backend, monkeypatch):
    from mantis_llm.llama_index import Mantis

    monkeypatch.setenv("FAL_KEY", "k")
    assert Mantis().metadata.context_window == 4096  # Mantis-llava-7b's, without loading anything
    assert Mantis(backend=local_backend).metadata.context_window == 512  # the tiny model's own
    assert Mantis(context_window=2048).metadata.context_window == 2048
    assert Conversation is not None
