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
# # LangChain: a chain and an agent with Mantis as the vision step
#
# Mantis reads several images at once, which makes it a good *vision step* inside a larger
# LangChain program. This notebook builds:
#
# 1. an LCEL chain, `prompt | ChatMantis | parser`, over two pictures;
# 2. the same chain with **structured output**: the answer parsed into a pydantic model;
# 3. an **agent loop**: Mantis chooses tools step by step (as JSON actions), a tool returns a
#    camera snapshot as an image, and Mantis compares it with the user's photo into a JSON report.
#
# Mantis has no native tool calling (`ChatMantis.bind_tools` raises `NotImplementedError`), so
# the agent is a ReAct-style loop in plain Python on `langchain-core` alone: the model answers
# with a JSON action, the loop runs the tool and hands its result back as a `ToolMessage`.
# The same loop maps onto a LangGraph graph if you use LangGraph; LangGraph's prebuilt
# `create_react_agent` needs `bind_tools` and does not apply.

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
from typing import Literal

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
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
# `with_structured_output(Schema)` appends the JSON schema to the last user message, asks for a
# JSON object only, and parses the answer into the pydantic model (an answer that does not parse
# raises `OutputParserException`; `include_raw=True` returns it instead of raising).


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
# ## 3. An agent: tools return images, Mantis looks at them
#
# A guest sends a photo of the house taken tonight and asks whether anything looks wrong. The
# agent has two tools: one lists the camera snapshots on file, the other returns a snapshot **as
# an image** (a list of content blocks becomes the `ToolMessage` content). At each step Mantis
# answers with a JSON `Step`; the loop runs the tool and appends the call and its result to the
# history, so the next step sees the snapshot next to the guest's photo. A step budget, and
# `include_raw=True` (an unparsable answer stops the loop instead of raising), keep it bounded.

# %%
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


TOOLS = {t.name: t for t in (list_snapshots, get_snapshot)}


class Step(BaseModel):
    """One agent step: call a tool, or finish."""

    thought: str = Field(description="Why this step")
    tool: Literal["list_snapshots", "get_snapshot", "finish"]
    args: dict[str, str] = Field(default_factory=dict, description="The tool's arguments")


SYSTEM = "You check houses from camera images, step by step. Each step, call one tool or finish. Tools:\n" + "\n".join(
    f"- {t.name}({', '.join(t.args)}): {t.description}" for t in TOOLS.values()
)
print(SYSTEM)

# %%
planner = model.with_structured_output(Step, include_raw=True)  # a bad answer is returned, not raised
history = [
    SystemMessage(SYSTEM),
    HumanMessage(
        content=[
            image_block(night),
            {"type": "text", "text": "I took this photo of the front of the house just now. Does anything look wrong?"},
        ]
    ),
]

if emu is not None:  # emulator only: the steps Mantis would take, as JSON
    emu.script(
        [
            '{"thought": "I need a reference photo of the front.", "tool": "list_snapshots", '
            '"args": {"camera": "front"}}',
            '{"thought": "Fetch the noon snapshot to compare.", "tool": "get_snapshot", '
            '"args": {"snapshot_id": "front@12:00"}}',
            '{"thought": "I have both images; I can compare them.", "tool": "finish", "args": {}}',
        ]
    )

for i in range(6):  # a step budget: never loop forever
    out = planner.invoke(history)
    step = out["parsed"]
    if step is None:
        print(f"step {i}: not a valid Step, stopping here: {out['raw'].content[:200]!r}")
        break
    print(f"step {i}: {step.tool}({step.args})  # {step.thought}")
    if step.tool == "finish":
        break
    call = {"type": "tool_call", "id": f"call_{i}", "name": step.tool, "args": step.args}
    try:
        result = TOOLS[step.tool].invoke(call)  # a ToolMessage; get_snapshot's holds an image
    except Exception as exc:  # e.g. a wrong argument name: report it to the model as a failed call
        result = ToolMessage(f"{type(exc).__name__}: {exc}", tool_call_id=call["id"], name=step.tool, status="error")
    history += [AIMessage(content=step.thought, tool_calls=[call]), result]
    print("   ->", result.content if isinstance(result.content, str) else [b["type"] for b in result.content])


# %% [markdown]
# Now the vision step proper: Mantis sees the whole history (the guest's photo and the snapshot
# the tool returned, in order) and writes the report as JSON.


# %%
class Report(BaseModel):
    """The agent's answer to the guest."""

    looks_wrong: bool = Field(description="Whether anything looks wrong or damaged")
    differences: list[str] = Field(description="Differences between the guest's photo and the snapshot")
    explanation: str = Field(description="One or two sentences for the guest")


if emu is not None:  # emulator only: the report Mantis would write
    emu.script(
        [
            '{"looks_wrong": false, "differences": ["night instead of day", "windows are lit", '
            '"moon and stars instead of the sun", "the tree is not visible"], "explanation": '
            '"Nothing looks wrong: the house is the same as in the noon snapshot, only at night with the lights on."}'
        ]
    )

images_seen = sum(1 for m in history if isinstance(m.content, list) for b in m.content if b["type"] == "image")
report = model.with_structured_output(Report).invoke(
    history + [HumanMessage("Compare my photo with the snapshot and answer my question.")]
)
print(f"{images_seen} images in context")
print(report.model_dump_json(indent=2))

# %% [markdown]
# In emulator mode, here is the prompt the emulator received for that last call: the Mantis
# conversation with one `<image>` placeholder where each image was (the images travel
# separately, in the same order).

# %%
if emu is not None:
    last = emu.submissions[-1].payload
    print(f"{len(last['images'])} images; prompt:\n")
    print(last["prompt"][:1500])

# %% [markdown]
# ## Clean up
#
# Close the models (their connection pools) and stop the emulator, so no server thread outlives
# the notebook.

# %%
model.close()
stop_emulator(emu)
