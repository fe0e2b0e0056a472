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
# # LlamaIndex: multimodal RAG with Mantis
#
# A small retrieval-augmented setup over a "house notebook": five pictures (photos, a chart, a
# wiring diagram, a floor plan) and a few text notes. A question retrieves the most relevant
# pictures and notes; Mantis answers with the retrieved **images in its context**.
#
# Retrieval uses a tiny keyword-hashing embedding written below, so the notebook runs offline
# with no embedding model; in an application you would use real text embeddings and CLIP-style
# image embeddings (e.g. `MultiModalVectorStoreIndex`). Pictures are found through their
# captions here.
#
# Two ways to ask Mantis:
# - `MantisMultiModal.complete(prompt, image_documents=...)`: the classic `MultiModalLLM` call,
#   with the retrieved `ImageNode`s;
# - `Mantis` in `RetrieverQueryEngine.from_args(..., multimodal=True)`: LlamaIndex's current
#   multimodal query engine, which interleaves each retrieved node's text and image.

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

emu, USE_REAL_FAL = emulator_unless_key(service_time=0.1)

# %% [markdown]
# ## The knowledge base

# %%
from pathlib import Path

from IPython.display import Image as Show
from IPython.display import display
from llama_index.core.schema import ImageNode, TextNode

IMAGES = Path("images")
CAPTIONS = {
    "house_day.png": "Photo of the house by day: red walls, brown roof, oak tree, sun.",
    "house_night.png": "Photo of the house at night: front windows lit, moon and stars.",
    "energy_chart.png": "Bar chart of monthly electricity use in kWh, January to June.",
    "solar_diagram.png": "Wiring diagram of the solar system: panels, inverter, battery, house, grid.",
    "floor_plan.png": "Ground floor plan: kitchen, living room, bedroom, bath, kitchen table, stairs.",
}
NOTES = [
    "The heat pump runs all day in January, which is why electricity use peaks in winter.",
    "The inverter was replaced in March; before that the battery did not charge from the panels.",
    "The porch and front window lights are on a timer from 20:00 to 23:00.",
    "The kitchen table seats six; the stairs are in the corner of the living room.",
]

nodes = [
    ImageNode(image_path=str(IMAGES / name), text=caption, metadata={"file": name})
    for name, caption in CAPTIONS.items()
] + [TextNode(text=note) for note in NOTES]
display(*(Show(filename=IMAGES / name, width=160) for name in CAPTIONS))

# %% [markdown]
# ## Retrieval
#
# `HashingEmbedding` maps each word to one of 1024 buckets and normalises the counts: texts that
# share words get similar vectors. It is a real `BaseEmbedding`, so the standard
# `VectorStoreIndex` and retrievers work with it unchanged. A `SimilarityPostprocessor` then drops
# hits that share (almost) no words with the question.

# %%
import hashlib
import math
import re

from llama_index.core import VectorStoreIndex
from llama_index.core.embeddings import BaseEmbedding
from llama_index.core.postprocessor import SimilarityPostprocessor

STOP_WORDS = (
    "a an and are as at be by do does for from how in is it of on so that the this to was what where which why with"
)
STOP = set(STOP_WORDS.split())


class HashingEmbedding(BaseEmbedding):
    """Bag of words hashed into `dim` buckets, L2-normalised (an offline stand-in)."""

    dim: int = 1024

    def _vector(self, text: str) -> list[float]:
        v = [0.0] * self.dim
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            if word not in STOP:
                v[int(hashlib.md5(word.rstrip("s").encode()).hexdigest(), 16) % self.dim] += 1.0
        norm = math.sqrt(sum(x * x for x in v)) or 1.0
        return [x / norm for x in v]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


index = VectorStoreIndex(nodes, embed_model=HashingEmbedding())
retriever = index.as_retriever(similarity_top_k=3)
relevant = SimilarityPostprocessor(similarity_cutoff=0.1)  # drop hits that share no words

question = "Why was electricity use so high in January?"
hits = relevant.postprocess_nodes(retriever.retrieve(question))
for hit in hits:
    kind = "image" if isinstance(hit.node, ImageNode) else "text "
    print(f"{hit.score:.2f}  {kind}  {hit.node.metadata.get('file', '')} {hit.node.text}")

# %% [markdown]
# ## Answering with `MantisMultiModal`
#
# The retrieved pictures go in as `image_documents` (placed before the prompt); the retrieved
# notes go into the prompt text.

# %%
from mantis_llm.llama_index import MantisMultiModal

mm = MantisMultiModal()


def ask(question: str) -> str:
    hits = relevant.postprocess_nodes(retriever.retrieve(question))
    pictures = [h.node for h in hits if isinstance(h.node, ImageNode)]
    notes = "\n".join(f"- {h.node.text}" for h in hits if not isinstance(h.node, ImageNode))
    prompt = f"Notes:\n{notes}\n\nUsing the images and the notes, answer: {question}"
    print(f"[{len(pictures)} image(s): {', '.join(p.metadata['file'] for p in pictures)}]")
    return mm.complete(prompt, image_documents=pictures).text


print(ask(question))
print(ask("How is the battery connected to the solar panels?"))

# %% [markdown]
# In emulator mode, here is what Mantis was sent for the last question: one `<image>`
# placeholder per retrieved picture, then the notes and the question.

# %%
if emu is not None:
    payload = emu.submissions[-1].payload
    print(f"{len(payload['images'])} image(s); prompt:\n{payload['prompt']}")

# %% [markdown]
# ## A query engine with `Mantis`
#
# `RetrieverQueryEngine.from_args(..., multimodal=True)` turns each retrieved node into content
# blocks (its metadata text and its image) and asks the LLM once per prompt-sized group of nodes.
# LlamaIndex budgets more tokens per image than Mantis uses (576), so a wider `context_window`
# keeps all retrieved pictures in one call. `response.source_nodes` says what was used.

# %%
from llama_index.core.query_engine import RetrieverQueryEngine

from mantis_llm.llama_index import Mantis

llm = Mantis(context_window=16384)
engine = RetrieverQueryEngine.from_args(retriever=retriever, llm=llm, multimodal=True, node_postprocessors=[relevant])

response = engine.query("Where are the stairs on the ground floor?")
print(response)
for source in response.source_nodes:
    print(f"  {source.score:.2f}", source.node.metadata.get("file") or source.node.text)

# %% [markdown]
# Streaming works the same way (`streaming=True`):

# %%
streaming_llm = Mantis(context_window=16384, backend_options={"mode": "stream"})
streaming_engine = RetrieverQueryEngine.from_args(
    retriever=retriever, llm=streaming_llm, multimodal=True, streaming=True, node_postprocessors=[relevant]
)
streaming_engine.query("Which windows are lit at night?").print_response_stream()
print()

# %% [markdown]
# ## Clean up
#
# Close the models (their connection pools) and stop the emulator, so no server thread outlives
# the notebook.

# %%
for model in (mm, llm, streaming_llm):
    model.close()
stop_emulator(emu)
