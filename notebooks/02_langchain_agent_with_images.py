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
# # Agents with Mantis: tools that return images, LangChain and LlamaIndex
#
# Mantis reads several images at once, which makes it a good *vision step* inside a larger
# program. This notebook builds:
#
# 1. an LCEL chain, `prompt | ChatMantis | parser`, over two pictures;
# 2. the same chain with **structured output**: the answer parsed into a pydantic model;
# 3. a LangChain **agent** with `create_agent`: Mantis calls tools (one returns a camera snapshot
#    as an image), looks at the snapshot next to the user's photo, and ends with a typed report;
# 4. the same with a LlamaIndex **FunctionAgent**.
#
# Mantis has no native function calling, so mantis-llm gives it one in the prompt: the tools are
# described in a system block, the model answers in text or with only a JSON call, and the call
# is parsed, validated against the tool's schema (`"3"` becomes `3`) and, on fal, repaired with
# up to two more turns when it is broken. With the local backend a grammar makes every call parse.
# The grammar guarantees the *format*; the model's judgement of when and which tool to call is
# still a 7B model's.

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
# In emulator mode, the structured-output and agent sections **script** the emulator's answers
# (`emu.script([...])`) with JSON that Mantis could plausibly give, so the parsing code runs for
# real; those cells say so where they do it.

# %%
import base64
from pathlib import Path

from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from mantis_llm.langchain import ChatMantis, image_block

IMAGES = Path("images")
day, night = IMAGES / "house_day.png", IMAGES / "house_night.png"


def b64(path):
    return base64.b64encode(Path(path).read_bytes()).decode()


model = ChatMantis()

# %% [markdown]
# ## 1. An LCEL chain
#
# A chat prompt template can hold image blocks whose data is a template variable; the chain
# fills them, Mantis answers, the parser returns a string. `batch` runs several inputs
# concurrently.

# %%
prompt = ChatPromptTemplate.from_messages(
    [
        ("system", "You are a careful, concise photo analyst."),
        (
            "human",
            [
                {"type": "image", "base64": "{first}", "mime_type": "image/png"},
                {"type": "image", "base64": "{second}", "mime_type": "image/png"},
                {"type": "text", "text": "{question}"},
            ],
        ),
    ]
)
chain = prompt | model | StrOutputParser()

pair = {"first": b64(day), "second": b64(night)}
print(chain.invoke({**pair, "question": "What are the differences between these two images?"}))
for text in chain.batch(
    [{**pair, "question": q} for q in ("Which picture was taken at night?", "Is it the same house?")]
):
    print("-", text)


# %% [markdown]
# ## 2. Structured output
#
# `with_structured_output(Schema)` asks for a JSON value of the schema and parses the answer into
# the pydantic model. A small model's habits ("Sure! Here is the JSON: ...", code fences, numbers
# in quotes) are repaired; an answer that still does not parse raises `OutputParserException`
# (`include_raw=True` returns it instead of raising).


# %%
class SceneChange(BaseModel):
    """What changed between two photos of the same place."""

    same_place: bool = Field(description="Whether both photos show the same place")
    differences: list[str] = Field(description="Visible differences, one short phrase each")
    windows_lit_in_second: bool = Field(description="Whether the windows are lit in the second photo")


structured_chain = prompt | model.with_structured_output(SceneChange)

if emu is not None:  # emulator only: the JSON answer Mantis would give
    emu.script(
        [
            '{"same_place": true, "differences": ["day vs night sky", "sun replaced by a moon and stars", '
            '"windows lit", "tree missing"], "windows_lit_in_second": true}'
        ]
    )

change = structured_chain.invoke({**pair, "question": "Compare the two photos."})
change

# %% [markdown]
# ## 3. A LangChain agent: `create_agent`, with a tool that returns an image
#
# A guest sends a photo of the house taken tonight and asks whether anything looks wrong. The
# agent has two tools: one lists the camera snapshots on file, the other returns a snapshot **as
# an image** (a list of content blocks becomes the `ToolMessage` content, which Mantis sees as an
# image in the next turn). `response_format=Report` makes the agent end with a typed report:
# LangChain offers the schema as one more tool and asks for a call at every step.

# %%
from langchain.agents import create_agent

SNAPSHOTS = {"front@12:00": day}  # camera id@time -> image file


@tool
def list_snapshots(camera: str) -> str:
    """List the snapshot ids on file for a camera (e.g. 'front')."""
    ids = [s for s in SNAPSHOTS if s.split("@")[0] == camera]
    return ", ".join(ids) or f"no snapshots for camera {camera!r}; cameras: front"


@tool
def get_snapshot(snapshot_id: str) -> list:
    """Return one camera snapshot as an image."""
    if snapshot_id not in SNAPSHOTS:
        return f"unknown snapshot {snapshot_id!r}; call list_snapshots first"
    return [{"type": "text", "text": f"Snapshot {snapshot_id}:"}, image_block(SNAPSHOTS[snapshot_id])]


class Report(BaseModel):
    """The agent's answer to the guest."""

    looks_wrong: bool = Field(description="Whether anything looks wrong or damaged")
    differences: list[str] = Field(description="Differences between the guest's photo and the snapshot")
    explanation: str = Field(description="One or two sentences for the guest")


agent = create_agent(
    model,
    tools=[list_snapshots, get_snapshot],
    system_prompt="You check houses from camera images. Compare the guest's photo with a snapshot before you report.",
    response_format=Report,
)

if emu is not None:  # emulator only: the calls Mantis would make, in the JSON it is asked for
    emu.script(
        [
            'I need a reference photo first.\n{"name": "list_snapshots", "arguments": {"camera": "front"}}',
            '{"name": "get_snapshot", "arguments": {"snapshot_id": "front@12:00"}}',
            '{"name": "Report", "arguments": {"looks_wrong": false, "differences": ["night instead of day", '
            '"windows are lit", "moon and stars instead of the sun"], "explanation": "Nothing looks wrong: '
            'it is the same house as in the noon snapshot, only at night with the lights on."}}',
        ]
    )

question = HumanMessage(
    content=[
        image_block(night),
        {"type": "text", "text": "I took this photo of the front of the house just now. Does anything look wrong?"},
    ]
)
result = agent.invoke({"messages": [question]})
for message in result["messages"]:
    calls = [f"{c['name']}({c['args']})" for c in getattr(message, "tool_calls", [])]
    kind = "image" if isinstance(message.content, list) else "text"
    print(f"{type(message).__name__:12} {', '.join(calls) or kind}")
print(result["structured_response"].model_dump_json(indent=2))

# %% [markdown]
# In emulator mode, here is what the model received for the last step: the Mantis conversation
# with one `<image>` placeholder where each image was (the guest's photo and the snapshot the
# tool returned; the images travel separately, in the same order), the calls written in the JSON
# the model is asked to use, and each tool result naming its tool and call id.

# %%
if emu is not None:
    last = emu.submissions[-1].payload
    print(f"{len(last['images'])} images; prompt:\n")
    print(last["prompt"][-1500:])

# %% [markdown]
# ## 4. The same with LlamaIndex: a `FunctionAgent`
#
# `Mantis` is a LlamaIndex `FunctionCallingLLM`, so `FunctionAgent` and `AgentWorkflow` drive
# it with tool calls (`ToolCallBlock`s), and `structured_predict` / `as_structured_llm` use the
# same path. The user's message carries the image.

# %%
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock

from mantis_llm.llama_index import Mantis


def count_windows(picture: str) -> int:
    """Count the lit windows the camera system recorded for a picture ('night' or 'day')."""
    return {"night": 3, "day": 0}.get(picture, 0)


llm = Mantis()
li_agent = FunctionAgent(tools=[count_windows], llm=llm, system_prompt="Answer with the tools' facts.")

if emu is not None:  # emulator only: the call and the answer Mantis would give
    emu.script(['{"name": "count_windows", "arguments": {"picture": "night"}}', "Three windows are lit."])

li_question = ChatMessage(
    role="user", blocks=[ImageBlock(path=night), TextBlock(text="How many windows are lit in this picture?")]
)
li_result = await li_agent.run(user_msg=li_question)
print(li_result.response.content, "| tools called:", [c.tool_name for c in li_result.tool_calls])

# %% [markdown]
# ## Clean up
#
# Close the models (their connection pools) and stop the emulator, so no server thread outlives
# the notebook.

# %%
model.close()
llm.close()
stop_emulator(emu)
