# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: Mantis from LangChain and LlamaIndex
#
# [Mantis](https://tiger-ai-lab.github.io/Mantis/) is TIGER-Lab's multi-image LLaVA: one prompt can
# hold several images, interleaved with text. `mantis-llm` makes it a LangChain chat model
# (`ChatMantis`) and a LlamaIndex LLM (`Mantis`), backed by fal's hosted endpoint or by a local
# transformers model (notebook 04).
#
# This notebook asks the seed question, *"What are the differences between these two images?"*,
# about two pictures, with images given as local files, URLs and PIL images; then streams an
# answer and watches the fal queue (position, status, log lines).
#
# ```
# pip install "mantis-llm[langchain,llama-index]"
# export FAL_KEY=...        # optional: without it the notebook runs against the emulator
# ```

# %% [markdown]
# ## Setup: the real fal endpoint, or the emulator
#
# With `FAL_KEY` set (or `FAL_KEY_ID` + `FAL_KEY_SECRET`), this notebook calls the hosted Mantis
# on fal (`fal-ai/mantis-llava-7b-v11`; calls are billed to your fal account).
#
# Without a key, **and always in CI** (`CI=true`), the next cell starts `FalEmulator`, a local
# HTTP server on 127.0.0.1 that speaks fal's queue protocol with a fake model, and points the
# `FAL_*` environment variables at it (the code is in `_setup.py`, next to this notebook).
# **Every answer you then see comes from the emulator, not from Mantis**: the fake model reports
# how many images it received and echoes the end of the prompt, or replays answers scripted in
# this notebook. The rest of the code is the same in both modes, and nothing is fetched from the
# internet.

# %%
from _setup import emulator_unless_key, stop_emulator

emu, USE_REAL_FAL = emulator_unless_key(service_time=0.3, concurrency=1)

# %% [markdown]
# In emulator mode the emulator runs one job at a time (`concurrency=1`), like a busy endpoint,
# so the queue section below has something to show. The two pictures ship with the notebooks
# (`images/`, drawn with Pillow):

# %%
from pathlib import Path

from IPython.display import Image as Show
from IPython.display import display

IMAGES = Path("images")
day, night = IMAGES / "house_day.png", IMAGES / "house_night.png"
QUESTION = "What are the differences between these two images?"
display(Show(filename=day, width=240), Show(filename=night, width=240))

# %% [markdown]
# ## 1. LangChain: `ChatMantis`
#
# Images are content blocks of a `HumanMessage`, in the order Mantis should see them. Local
# files and PIL images travel as base64 (`image_block` below); small images are sent inline,
# large ones are uploaded to fal storage once and sent by URL.

# %%
from langchain_core.messages import HumanMessage

from mantis_llm.langchain import ChatMantis, image_block  # image_block: a path, bytes or PIL image as a content block

chat = ChatMantis()  # fal-ai/mantis-llava-7b-v11; FAL_KEY from the environment
message = HumanMessage(content=[image_block(day), image_block(night), {"type": "text", "text": QUESTION}])
answer = chat.invoke([message])
print(answer.content)
print("request id:", answer.response_metadata["request_id"])

# %% [markdown]
# ### Images by URL
#
# http(s) URLs are passed to fal as they are, and fal downloads them, so with the real endpoint
# they must be public: we use the pair from fal's own Mantis example. In emulator mode we serve
# `images/` on 127.0.0.1 instead (the emulator checks the URL but downloads nothing). OpenAI-style
# blocks (`{"type": "image_url", "image_url": {"url": ...}}`) work too.

# %%
if USE_REAL_FAL:
    urls = [
        "https://llava-vl.github.io/static/images/monalisa.jpg",
        "https://llava-vl.github.io/static/images/view.jpg",
    ]
else:
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    image_server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=IMAGES))
    threading.Thread(target=image_server.serve_forever, daemon=True).start()
    urls = [f"http://127.0.0.1:{image_server.server_port}/{name}" for name in ("house_day.png", "house_night.png")]

answer = chat.invoke(
    [
        HumanMessage(
            content=[
                {"type": "image", "url": urls[0]},
                {"type": "image", "url": urls[1]},
                {"type": "text", "text": QUESTION},
            ]
        )
    ]
)
print(urls)
print(answer.content)

# %% [markdown]
# ### PIL images
#
# Any PIL image works the same way, here the day picture and its mirror image:

# %%
from PIL import Image as PILImage
from PIL import ImageOps

photo = PILImage.open(day)
mirrored = ImageOps.mirror(photo)
answer = chat.invoke(
    [HumanMessage(content=[image_block(photo), image_block(mirrored), {"type": "text", "text": QUESTION}])]
)
print(answer.content)

# %% [markdown]
# ### Streaming
#
# `stream()` streams tokens by default: in the default mode `"auto"`, a streaming call goes to
# fal's streaming endpoint and text arrives as it is generated (here one chunk per line), while
# `invoke()` goes through the queue, with its progress reports, retries and cancellation. (An
# endpoint without a token stream falls back to the queue, and the answer comes as one chunk.)

# %%
for chunk in chat.stream([message]):
    print(repr(chunk.content))

# %% [markdown]
# ### Queue position and logs
#
# `on_update` is called with every progress report of the fal queue: status (`IN_QUEUE`,
# `IN_PROGRESS`, `COMPLETED`), queue position and, with `with_logs=True`, the app's log lines.
# Three requests sent at once queue behind each other:

# %%
updates = []
watched = ChatMantis(on_update=updates.append, backend_options={"with_logs": True})
answers = watched.batch([[message]] * 3)  # three requests at once, from three threads

for u in updates:
    logs = "; ".join(line["message"] for line in u.logs)
    print(f"{u.request_id[:8]}  {u.status:<11}  queue_position={u.queue_position}  {logs}")

# %% [markdown]
# The same reports reach LangChain callback handlers as the custom event `"mantis_queue_update"`
# (on `invoke`, `batch` and their async twins), so a tracing or UI handler sees them without
# touching the model:

# %%
from langchain_core.callbacks import BaseCallbackHandler


class QueueWatcher(BaseCallbackHandler):
    def on_custom_event(self, name, data, **kwargs):
        if name == "mantis_queue_update":
            print(f"{data['status']:<11} queue_position={data['queue_position']}")


answer = chat.invoke([message], config={"callbacks": [QueueWatcher()]})

# %% [markdown]
# ### Errors
#
# Problems come back as typed `mantis_llm.errors.MantisError`s with a message that says which
# image of which message is wrong, before anything is sent:

# %%
from mantis_llm import errors

try:
    chat.invoke([HumanMessage(content=[image_block(b"this is not a picture"), {"type": "text", "text": QUESTION}])])
except errors.MantisError as exc:
    print(f"{type(exc).__name__}: {exc}")

# %% [markdown]
# ## 2. LlamaIndex: `Mantis`
#
# `Mantis` is a LlamaIndex chat `LLM`; images are `ImageBlock`s (a `path`, a `url` or raw `image`
# bytes) in a `ChatMessage`, in order.

# %%
from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock

from mantis_llm.llama_index import Mantis

llm = Mantis()
msg = ChatMessage(role="user", blocks=[ImageBlock(path=day), ImageBlock(path=night), TextBlock(text=QUESTION)])
print(llm.chat([msg]).message.content)

# %% [markdown]
# A URL and a PIL image, through `complete(prompt, image_documents=...)`:

# %%
from mantis_llm.llama_index import image_block  # ImageBlock itself takes no PIL image

print(llm.complete(QUESTION, image_documents=[ImageBlock(url=urls[0]), image_block(mirrored)]).text)

# %% [markdown]
# Streaming and queue reports: `stream_chat` yields deltas; progress reports are LlamaIndex
# instrumentation events (`MantisUpdateEvent`) that any event handler can pick up (`on_update=`
# works here too). fal's streaming endpoint runs outside the queue, so only the non-streaming
# call reports queue progress.

# %%
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler

from mantis_llm.llama_index import MantisUpdateEvent


class QueuePrinter(BaseEventHandler):
    def handle(self, event, **kwargs):
        if isinstance(event, MantisUpdateEvent):
            print(f"  [{event.status} queue_position={event.queue_position}]")


printer = QueuePrinter()
get_dispatcher().add_event_handler(printer)

for part in llm.stream_chat([msg]):
    print(repr(part.delta))

print("not streaming, through the queue:")
print(llm.chat([msg]).message.content)
get_dispatcher().event_handlers.remove(printer)

# %% [markdown]
# ## Clean up
#
# Close the models (their connection pools) and stop the emulator, so no server thread outlives
# the notebook.

# %%
for model in (chat, watched, llm):
    model.close()
if not USE_REAL_FAL:
    image_server.shutdown()
    image_server.server_close()
stop_emulator(emu)
