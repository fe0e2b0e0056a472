"""Write the notebooks in this folder from the cell texts below (outputs stripped).

Run ``python notebooks/_build.py`` after editing a cell here, never edit the .ipynb by hand:
the notebooks are generated so that the shared setup/teardown cells stay identical and the
committed files carry no outputs. Not part of the package.
"""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


# ----------------------------------------------------------------- shared cells

SETUP_MD = md(
    """
    ## Setup: the real fal endpoint, or the emulator

    With `FAL_KEY` set (or `FAL_KEY_ID` + `FAL_KEY_SECRET`), this notebook calls the hosted Mantis
    on fal (`fal-ai/mantis-llava-7b-v11`; calls are billed to your fal account).

    Without a key, **and always in CI** (`CI=true`), the next cell starts `FalEmulator`, a local
    HTTP server on 127.0.0.1 that speaks fal's queue protocol with a fake model, and points the
    `FAL_*` environment variables at it. **Every answer you then see comes from the emulator, not
    from Mantis**: the fake model reports how many images it received and echoes the end of the
    prompt, or replays answers scripted in this notebook. The rest of the code is the same in both
    modes, and nothing is fetched from the internet.
    """
)

SETUP = code(
    """
    import os

    HAS_KEY = bool(os.environ.get("FAL_KEY") or (os.environ.get("FAL_KEY_ID") and os.environ.get("FAL_KEY_SECRET")))
    IN_CI = os.environ.get("CI", "").lower() in ("1", "true")
    USE_REAL_FAL = HAS_KEY and not IN_CI

    emu = None
    if USE_REAL_FAL:
        print("Using the REAL fal endpoint fal-ai/mantis-llava-7b-v11 (FAL_KEY is set; calls are billed).")
    else:
        from mantis_llm.emulator import FalEmulator

        emu = FalEmulator(service_time=EMULATOR_SERVICE_TIME).start()
        os.environ.update(emu.env())  # FAL_KEY, FAL_QUEUE_URL, FAL_RUN_URL, ... now point at the emulator
        why = "CI=true" if IN_CI else "no FAL_KEY"
        print(f"EMULATOR MODE ({why}): every answer below comes from mantis_llm's FalEmulator at {emu.url},")
        print("a fake model on this machine -- not from Mantis.")
    """
)


def setup_cell(service_time: float, concurrency: int | None = None):
    """The setup cell with this notebook's emulator settings."""
    args = f"{service_time}" + (f", concurrency={concurrency}" if concurrency else "")
    cell = code(SETUP.source.replace("service_time=EMULATOR_SERVICE_TIME", f"service_time={args}"))
    return cell



TEARDOWN_MD = md(
    """
    ## Clean up

    Close the models (their connection pools) and stop the emulator, so no server thread outlives
    the notebook.
    """
)


def teardown(closing: str):
    return code(
        closing.strip()
        + """
if emu is not None:
    emu.stop()
    print("emulator stopped")
"""
    )


def notebook(cells) -> nbformat.NotebookNode:
    cells = copy.deepcopy(cells)  # the shared cells are reused by several notebooks
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding gives no spurious diffs
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


# ----------------------------------------------------------------- 01 quickstart

QUICKSTART = [
    md(
        """
        # Quickstart: Mantis from LangChain and LlamaIndex

        [Mantis](https://tiger-ai-lab.github.io/Mantis/) is TIGER-Lab's multi-image LLaVA: one prompt can
        hold several images, interleaved with text. `mantis-llm` makes it a LangChain chat model
        (`ChatMantis`) and a LlamaIndex LLM (`Mantis`), backed by fal's hosted endpoint or by a local
        transformers model (notebook 04).

        This notebook asks the seed question, *"What are the differences between these two images?"*,
        about two pictures, with images given as local files, URLs and PIL images; then streams an
        answer and watches the fal queue (position, status, log lines).

        ```
        pip install "mantis-llm[langchain,llama-index]"
        export FAL_KEY=...        # optional: without it the notebook runs against the emulator
        ```
        """
    ),
    SETUP_MD,
    setup_cell(0.3, concurrency=1),
    md(
        """
        In emulator mode the emulator runs one job at a time (`concurrency=1`), like a busy endpoint,
        so the queue section below has something to show. The two pictures ship with the notebooks
        (`images/`, drawn with Pillow):
        """
    ),
    code(
        """
        from pathlib import Path

        from IPython.display import Image as Show, display

        IMAGES = Path("images")
        day, night = IMAGES / "house_day.png", IMAGES / "house_night.png"
        QUESTION = "What are the differences between these two images?"
        display(Show(filename=day, width=240), Show(filename=night, width=240))
        """
    ),
    md(
        """
        ## 1. LangChain: `ChatMantis`

        Images are content blocks of a `HumanMessage`, in the order Mantis should see them. Local
        files and PIL images travel as base64 (`image_block` below); small images are sent inline,
        large ones are uploaded to fal storage once and sent by URL.
        """
    ),
    code(
        """
from langchain_core.messages import HumanMessage

from mantis_llm.langchain import ChatMantis, image_block  # image_block: a path, bytes or PIL image as a content block

chat = ChatMantis()  # fal-ai/mantis-llava-7b-v11; FAL_KEY from the environment
message = HumanMessage(content=[image_block(day), image_block(night), {"type": "text", "text": QUESTION}])
answer = chat.invoke([message])
print(answer.content)
print("request id:", answer.response_metadata["request_id"])
"""
    ),
    md(
        """
        ### Images by URL

        http(s) URLs are passed to fal as they are, and fal downloads them, so with the real endpoint
        they must be public: we use the pair from fal's own Mantis example. In emulator mode we serve
        `images/` on 127.0.0.1 instead (the emulator checks the URL but downloads nothing). OpenAI-style
        blocks (`{"type": "image_url", "image_url": {"url": ...}}`) work too.
        """
    ),
    code(
        """
        if USE_REAL_FAL:
            urls = ["https://llava-vl.github.io/static/images/monalisa.jpg",
                    "https://llava-vl.github.io/static/images/view.jpg"]
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

        answer = chat.invoke([HumanMessage(content=[
            {"type": "image", "url": urls[0]},
            {"type": "image", "url": urls[1]},
            {"type": "text", "text": QUESTION},
        ])])
        print(urls)
        print(answer.content)
        """
    ),
    md("### PIL images\n\nAny PIL image works the same way, here the day picture and its mirror image:"),
    code(
        """
        from PIL import Image as PILImage, ImageOps

        photo = PILImage.open(day)
        mirrored = ImageOps.mirror(photo)
        answer = chat.invoke([HumanMessage(content=[image_block(photo), image_block(mirrored), {"type": "text", "text": QUESTION}])])
        print(answer.content)
        """
    ),
    md(
        """
        ### Streaming

        fal's queue (the default mode) has no token stream: `stream()` then yields the whole answer as
        one chunk when the job ends. `backend_options={"mode": "stream"}` uses fal's streaming endpoint
        instead, and text arrives as it is generated (here one chunk per line):
        """
    ),
    code(
        """
        streaming_chat = ChatMantis(backend_options={"mode": "stream"})
        for chunk in streaming_chat.stream([message]):
            print(repr(chunk.content))
        """
    ),
    md(
        """
        ### Queue position and logs

        `on_update` is called with every progress report of the fal queue: status (`IN_QUEUE`,
        `IN_PROGRESS`, `COMPLETED`), queue position and, with `with_logs=True`, the app's log lines.
        Three requests sent at once queue behind each other:
        """
    ),
    code(
        """
        updates = []
        watched = ChatMantis(on_update=updates.append, backend_options={"with_logs": True})
        answers = watched.batch([[message]] * 3)  # three requests at once, from three threads

        for u in updates:
            logs = "; ".join(line["message"] for line in u.logs)
            print(f"{u.request_id[:8]}  {u.status:<11}  queue_position={u.queue_position}  {logs}")
        """
    ),
    md(
        """
        The same reports reach LangChain callback handlers as the custom event `"mantis_queue_update"`
        (on `invoke`, `batch` and their async twins), so a tracing or UI handler sees them without
        touching the model:
        """
    ),
    code(
        """
        from langchain_core.callbacks import BaseCallbackHandler


        class QueueWatcher(BaseCallbackHandler):
            def on_custom_event(self, name, data, **kwargs):
                if name == "mantis_queue_update":
                    print(f"{data['status']:<11} queue_position={data['queue_position']}")


        answer = chat.invoke([message], config={"callbacks": [QueueWatcher()]})
        """
    ),
    md(
        """
        ### Errors

        Problems come back as typed `mantis_llm.errors.MantisError`s with a message that says which
        image of which message is wrong, before anything is sent:
        """
    ),
    code(
        """
        from mantis_llm import errors

        try:
            chat.invoke([HumanMessage(content=[image_block(b"this is not a picture"), {"type": "text", "text": QUESTION}])])
        except errors.MantisError as exc:
            print(f"{type(exc).__name__}: {exc}")
        """
    ),
    md(
        """
        ## 2. LlamaIndex: `Mantis`

        `Mantis` is a LlamaIndex chat `LLM`; images are `ImageBlock`s (a `path`, a `url` or raw `image`
        bytes) in a `ChatMessage`, in order.
        """
    ),
    code(
        """
        from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock

        from mantis_llm.llama_index import Mantis

        llm = Mantis()
        msg = ChatMessage(role="user", blocks=[ImageBlock(path=day), ImageBlock(path=night), TextBlock(text=QUESTION)])
        print(llm.chat([msg]).message.content)
        """
    ),
    md("A URL and a PIL image, through `complete(prompt, image_documents=...)`:"),
    code(
        """
        from mantis_llm.llama_index import image_block  # ImageBlock itself takes no PIL image

        print(llm.complete(QUESTION, image_documents=[ImageBlock(url=urls[0]), image_block(mirrored)]).text)
        """
    ),
    md(
        """
        Streaming and queue reports: `stream_chat` yields deltas; progress reports are LlamaIndex
        instrumentation events (`MantisUpdateEvent`) that any event handler can pick up (`on_update=`
        works here too). fal's streaming endpoint runs outside the queue, so only the queue-mode call
        reports progress.
        """
    ),
    code(
        """
        from llama_index.core.instrumentation import get_dispatcher
        from llama_index.core.instrumentation.event_handlers import BaseEventHandler

        from mantis_llm.llama_index import MantisUpdateEvent


        class QueuePrinter(BaseEventHandler):
            def handle(self, event, **kwargs):
                if isinstance(event, MantisUpdateEvent):
                    print(f"  [{event.status} queue_position={event.queue_position}]")


        printer = QueuePrinter()
        get_dispatcher().add_event_handler(printer)

        streaming_llm = Mantis(backend_options={"mode": "stream"})
        for part in streaming_llm.stream_chat([msg]):
            print(repr(part.delta))

        print("queue mode:")
        print(llm.chat([msg]).message.content)
        get_dispatcher().event_handlers.remove(printer)
        """
    ),
    TEARDOWN_MD,
    teardown(
        """
for model in (chat, streaming_chat, watched, llm, streaming_llm):
    model.close()
if not USE_REAL_FAL:
    image_server.shutdown()
    image_server.server_close()
"""
    ),
]


# ----------------------------------------------------------------- 02 langchain agent

AGENT = [
    md(
        """
        # LangChain: a chain and an agent with Mantis as the vision step

        Mantis reads several images at once, which makes it a good *vision step* inside a larger
        LangChain program. This notebook builds:

        1. an LCEL chain, `prompt | ChatMantis | parser`, over two pictures;
        2. the same chain with **structured output**: the answer parsed into a pydantic model;
        3. an **agent loop**: Mantis chooses tools step by step (as JSON actions), a tool returns a
           camera snapshot as an image, and Mantis compares it with the user's photo into a JSON report.

        Mantis has no native tool calling (`ChatMantis.bind_tools` raises `NotImplementedError`), so
        the agent is a ReAct-style loop in plain Python on `langchain-core` alone: the model answers
        with a JSON action, the loop runs the tool and hands its result back as a `ToolMessage`.
        The same loop maps onto a LangGraph graph if you use LangGraph; LangGraph's prebuilt
        `create_react_agent` needs `bind_tools` and does not apply.
        """
    ),
    SETUP_MD,
    setup_cell(0.1),
    md(
        """
        In emulator mode, the structured-output and agent sections **script** the emulator's answers
        (`emu.script([...])`) with JSON that Mantis could plausibly give, so the parsing code runs for
        real; those cells say so where they do it.
        """
    ),
    code(
        "import base64\n"
        "import json\n"
        "from pathlib import Path\n"
        "from typing import Literal\n\n"
        "from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage\n"
        "from langchain_core.output_parsers import StrOutputParser\n"
        "from langchain_core.prompts import ChatPromptTemplate\n"
        "from langchain_core.tools import tool\n"
        "from pydantic import BaseModel, Field\n\n"
        "from mantis_llm.langchain import ChatMantis, image_block\n\n"
        'IMAGES = Path("images")\n'
        'day, night = IMAGES / "house_day.png", IMAGES / "house_night.png"\n'
        + """


def b64(path):
    return base64.b64encode(Path(path).read_bytes()).decode()


model = ChatMantis()
"""
    ),
    md(
        """
        ## 1. An LCEL chain

        A chat prompt template can hold image blocks whose data is a template variable; the chain
        fills them, Mantis answers, the parser returns a string. `batch` runs several inputs
        concurrently.
        """
    ),
    code(
        """
        prompt = ChatPromptTemplate.from_messages([
            ("system", "You are a careful, concise photo analyst."),
            ("human", [
                {"type": "image", "base64": "{first}", "mime_type": "image/png"},
                {"type": "image", "base64": "{second}", "mime_type": "image/png"},
                {"type": "text", "text": "{question}"},
            ]),
        ])
        chain = prompt | model | StrOutputParser()

        pair = {"first": b64(day), "second": b64(night)}
        print(chain.invoke({**pair, "question": "What are the differences between these two images?"}))
        for text in chain.batch([{**pair, "question": q} for q in ("Which picture was taken at night?", "Is it the same house?")]):
            print("-", text)
        """
    ),
    md(
        """
        ## 2. Structured output

        `with_structured_output(Schema)` appends the JSON schema to the last user message, asks for a
        JSON object only, and parses the answer into the pydantic model (an answer that does not parse
        raises `OutputParserException`; `include_raw=True` returns it instead of raising).
        """
    ),
    code(
        """
        class SceneChange(BaseModel):
            \"\"\"What changed between two photos of the same place.\"\"\"

            same_place: bool = Field(description="Whether both photos show the same place")
            differences: list[str] = Field(description="Visible differences, one short phrase each")
            windows_lit_in_second: bool = Field(description="Whether the windows are lit in the second photo")


        structured_chain = prompt | model.with_structured_output(SceneChange)

        if emu is not None:  # emulator only: the JSON answer Mantis would give
            emu.script(['{"same_place": true, "differences": ["day vs night sky", "sun replaced by a moon and stars", '
                        '"windows lit", "tree missing"], "windows_lit_in_second": true}'])

        change = structured_chain.invoke({**pair, "question": "Compare the two photos."})
        change
        """
    ),
    md(
        """
        ## 3. An agent: tools return images, Mantis looks at them

        A guest sends a photo of the house taken tonight and asks whether anything looks wrong. The
        agent has two tools: one lists the camera snapshots on file, the other returns a snapshot **as
        an image** (a list of content blocks becomes the `ToolMessage` content). At each step Mantis
        answers with a JSON `Step`; the loop runs the tool and appends the call and its result to the
        history, so the next step sees the snapshot next to the guest's photo. A step budget, and
        `include_raw=True` (an unparsable answer stops the loop instead of raising), keep it bounded.
        """
    ),
    code(
        """
        SNAPSHOTS = {"front@12:00": day}  # camera id@time -> image file


        @tool
        def list_snapshots(camera: str) -> str:
            \"\"\"List the snapshot ids on file for a camera (e.g. 'front').\"\"\"
            ids = [s for s in SNAPSHOTS if s.split("@")[0] == camera]
            return ", ".join(ids) or f"no snapshots for camera {camera!r}; cameras: front"


        @tool
        def get_snapshot(snapshot_id: str) -> list:
            \"\"\"Return one camera snapshot as an image.\"\"\"
            if snapshot_id not in SNAPSHOTS:
                return f"unknown snapshot {snapshot_id!r}; call list_snapshots first"
            return [{"type": "text", "text": f"Snapshot {snapshot_id}:"}, image_block(SNAPSHOTS[snapshot_id])]


        TOOLS = {t.name: t for t in (list_snapshots, get_snapshot)}


        class Step(BaseModel):
            \"\"\"One agent step: call a tool, or finish.\"\"\"

            thought: str = Field(description="Why this step")
            tool: Literal["list_snapshots", "get_snapshot", "finish"]
            args: dict[str, str] = Field(default_factory=dict, description="The tool's arguments")


        SYSTEM = "You check houses from camera images, step by step. Each step, call one tool or finish. Tools:\\n" + "\\n".join(
            f"- {t.name}({', '.join(t.args)}): {t.description}" for t in TOOLS.values()
        )
        print(SYSTEM)
        """
    ),
    code(
        """
        planner = model.with_structured_output(Step, include_raw=True)  # a bad answer is returned, not raised
        history = [
            SystemMessage(SYSTEM),
            HumanMessage(content=[image_block(night), {"type": "text", "text": "I took this photo of the front of the house just now. Does anything look wrong?"}]),
        ]

        if emu is not None:  # emulator only: the steps Mantis would take, as JSON
            emu.script([
                '{"thought": "I need a reference photo of the front.", "tool": "list_snapshots", "args": {"camera": "front"}}',
                '{"thought": "Fetch the noon snapshot to compare.", "tool": "get_snapshot", "args": {"snapshot_id": "front@12:00"}}',
                '{"thought": "I have both images; I can compare them.", "tool": "finish", "args": {}}',
            ])

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
        """
    ),
    md(
        """
        Now the vision step proper: Mantis sees the whole history (the guest's photo and the snapshot
        the tool returned, in order) and writes the report as JSON.
        """
    ),
    code(
        """
        class Report(BaseModel):
            \"\"\"The agent's answer to the guest.\"\"\"

            looks_wrong: bool = Field(description="Whether anything looks wrong or damaged")
            differences: list[str] = Field(description="Differences between the guest's photo and the snapshot")
            explanation: str = Field(description="One or two sentences for the guest")


        if emu is not None:  # emulator only: the report Mantis would write
            emu.script(['{"looks_wrong": false, "differences": ["night instead of day", "windows are lit", '
                        '"moon and stars instead of the sun", "the tree is not visible"], "explanation": '
                        '"Nothing looks wrong: the house is the same as in the noon snapshot, only at night with the lights on."}'])

        images_seen = sum(1 for m in history if isinstance(m.content, list) for b in m.content if b["type"] == "image")
        report = model.with_structured_output(Report).invoke(
            history + [HumanMessage("Compare my photo with the snapshot and answer my question.")]
        )
        print(f"{images_seen} images in context")
        print(report.model_dump_json(indent=2))
        """
    ),
    md(
        """
        In emulator mode, here is the prompt the emulator received for that last call: the Mantis
        conversation with one `<image>` placeholder where each image was (the images travel
        separately, in the same order).
        """
    ),
    code(
        """
        if emu is not None:
            last = emu.submissions[-1].payload
            print(f"{len(last['images'])} images; prompt:\\n")
            print(last["prompt"][:1500])
        """
    ),
    TEARDOWN_MD,
    teardown("model.close()"),
]


# ----------------------------------------------------------------- 03 llamaindex rag

RAG = [
    md(
        """
        # LlamaIndex: multimodal RAG with Mantis

        A small retrieval-augmented setup over a "house notebook": five pictures (photos, a chart, a
        wiring diagram, a floor plan) and a few text notes. A question retrieves the most relevant
        pictures and notes; Mantis answers with the retrieved **images in its context**.

        Retrieval uses a tiny keyword-hashing embedding written below, so the notebook runs offline
        with no embedding model; in an application you would use real text embeddings and CLIP-style
        image embeddings (e.g. `MultiModalVectorStoreIndex`). Pictures are found through their
        captions here.

        Two ways to ask Mantis:
        - `MantisMultiModal.complete(prompt, image_documents=...)`: the classic `MultiModalLLM` call,
          with the retrieved `ImageNode`s;
        - `Mantis` in `RetrieverQueryEngine.from_args(..., multimodal=True)`: LlamaIndex's current
          multimodal query engine, which interleaves each retrieved node's text and image.
        """
    ),
    SETUP_MD,
    setup_cell(0.1),
    md("## The knowledge base"),
    code(
        """
        from pathlib import Path

        from IPython.display import Image as Show, display
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
        """
    ),
    md(
        """
        ## Retrieval

        `HashingEmbedding` maps each word to one of 1024 buckets and normalises the counts: texts that
        share words get similar vectors. It is a real `BaseEmbedding`, so the standard
        `VectorStoreIndex` and retrievers work with it unchanged. A `SimilarityPostprocessor` then drops
        hits that share (almost) no words with the question.
        """
    ),
    code(
        """
        import hashlib
        import math
        import re

        from llama_index.core import VectorStoreIndex
        from llama_index.core.embeddings import BaseEmbedding
        from llama_index.core.postprocessor import SimilarityPostprocessor

        STOP = set("a an and are as at be by do does for from how in is it of on so that the this to was what where which why with".split())


        class HashingEmbedding(BaseEmbedding):
            \"\"\"Bag of words hashed into `dim` buckets, L2-normalised (an offline stand-in).\"\"\"

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
        """
    ),
    md(
        """
        ## Answering with `MantisMultiModal`

        The retrieved pictures go in as `image_documents` (placed before the prompt); the retrieved
        notes go into the prompt text.
        """
    ),
    code(
        """
        from mantis_llm.llama_index import MantisMultiModal

        mm = MantisMultiModal()


        def ask(question: str) -> str:
            hits = relevant.postprocess_nodes(retriever.retrieve(question))
            pictures = [h.node for h in hits if isinstance(h.node, ImageNode)]
            notes = "\\n".join(f"- {h.node.text}" for h in hits if not isinstance(h.node, ImageNode))
            prompt = f"Notes:\\n{notes}\\n\\nUsing the images and the notes, answer: {question}"
            print(f"[{len(pictures)} image(s): {', '.join(p.metadata['file'] for p in pictures)}]")
            return mm.complete(prompt, image_documents=pictures).text


        print(ask(question))
        print(ask("How is the battery connected to the solar panels?"))
        """
    ),
    md(
        """
        In emulator mode, here is what Mantis was sent for the last question: one `<image>`
        placeholder per retrieved picture, then the notes and the question.
        """
    ),
    code(
        """
        if emu is not None:
            payload = emu.submissions[-1].payload
            print(f"{len(payload['images'])} image(s); prompt:\\n{payload['prompt']}")
        """
    ),
    md(
        """
        ## A query engine with `Mantis`

        `RetrieverQueryEngine.from_args(..., multimodal=True)` turns each retrieved node into content
        blocks (its metadata text and its image) and asks the LLM once per prompt-sized group of nodes.
        LlamaIndex budgets more tokens per image than Mantis uses (576), so a wider `context_window`
        keeps all retrieved pictures in one call. `response.source_nodes` says what was used.
        """
    ),
    code(
        """
        from llama_index.core.query_engine import RetrieverQueryEngine

        from mantis_llm.llama_index import Mantis

        llm = Mantis(context_window=16384)
        engine = RetrieverQueryEngine.from_args(retriever=retriever, llm=llm, multimodal=True, node_postprocessors=[relevant])

        response = engine.query("Where are the stairs on the ground floor?")
        print(response)
        for source in response.source_nodes:
            print(f"  {source.score:.2f}", source.node.metadata.get("file") or source.node.text)
        """
    ),
    md("Streaming works the same way (`streaming=True`):"),
    code(
        """
        streaming_llm = Mantis(context_window=16384, backend_options={"mode": "stream"})
        streaming_engine = RetrieverQueryEngine.from_args(
            retriever=retriever, llm=streaming_llm, multimodal=True, streaming=True, node_postprocessors=[relevant]
        )
        streaming_engine.query("Which windows are lit at night?").print_response_stream()
        print()
        """
    ),
    TEARDOWN_MD,
    teardown(
        """
for model in (mm, llm, streaming_llm):
    model.close()
"""
    ),
]


# ----------------------------------------------------------------- 04 local backend

LOCAL = [
    md(
        """
        # The local backend: Mantis in-process with transformers

        `backend="local"` runs Mantis in this Python process with stock transformers
        (`LlavaForConditionalGeneration`), through the same `ChatMantis` / `Mantis` calls as the fal
        notebooks: loading, streaming token by token, batching, and what memory and speed to expect.

        ```
        pip install "mantis-llm[all]"   # adds torch and transformers
        ```

        The real model, `TIGER-Lab/Mantis-llava-7b`, is a 15 GB download and wants a GPU. **This
        notebook never downloads anything** (`HF_HUB_OFFLINE=1`): it uses the real weights only when
        they are already in your Hugging Face cache and a GPU is present (or a local directory named by
        `MANTIS_LOCAL_MODEL`). Otherwise, and always in CI, it builds a **tiny random-weight model**
        with the real Mantis architecture (CLIP vision tower, projector, Llama decoder) in a temporary
        folder: every code path is the real one, but **its answers are random characters and its
        timings say nothing about the 7B model**. This notebook does not use fal, so no emulator runs.
        """
    ),
    code(
        """
        import os
        import tempfile
        import time
        import warnings
        from pathlib import Path

        os.environ["HF_HUB_OFFLINE"] = "1"  # never download weights from this notebook
        warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

        import torch
        from huggingface_hub import try_to_load_from_cache

        REAL_MODEL = "TIGER-Lab/Mantis-llava-7b"
        IN_CI = os.environ.get("CI", "").lower() in ("1", "true")
        cached = isinstance(try_to_load_from_cache(REAL_MODEL, "config.json"), str)

        if os.environ.get("MANTIS_LOCAL_MODEL") and not IN_CI:
            MODEL, TINY = os.environ["MANTIS_LOCAL_MODEL"], False
        elif cached and torch.cuda.is_available() and not IN_CI:
            MODEL, TINY = REAL_MODEL, False
        else:
            from mantis_llm.testing import build_tiny_mantis

            t = time.perf_counter()
            MODEL, TINY = str(build_tiny_mantis(Path(tempfile.gettempdir()) / "mantis-llm-notebook-tiny")), True
            print(f"tiny random model ready in {time.perf_counter() - t:.1f}s (built once, then reused)")

        if TINY:
            print(f"TINY RANDOM MODEL at {MODEL}: the real Mantis weights are not used here, so answers are")
            print("random characters and timings do not reflect the 7B model.")
        else:
            print(f"Using the real model {MODEL}.")
        """
    ),
    md(
        """
        ## Loading

        The model loads on the first request, or when you call `load()`. The default device is CUDA
        when available (bfloat16), else CPU (float32); `backend_options={"device": ..., "dtype": ...}`
        chooses. One worker thread owns the model.
        """
    ),
    code(
        """
        from transformers.utils import logging as hf_logging

        from mantis_llm.langchain import ChatMantis

        hf_logging.disable_progress_bar()  # no "Loading weights" bars in the output

        chat = ChatMantis(backend="local", model=MODEL, max_tokens=24)
        t = time.perf_counter()
        backend = chat.get_backend().load()
        print(f"loaded in {time.perf_counter() - t:.1f}s: {backend}")

        hf_model = backend.hf_model
        n_params = sum(p.numel() for p in hf_model.parameters())
        weight_mb = sum(p.numel() * p.element_size() for p in hf_model.parameters()) / 2**20
        print(f"device={hf_model.device}  dtype={hf_model.dtype}  parameters={n_params:,}  weights={weight_mb:.1f} MiB")
        print(f"{backend.tokens_per_image} tokens per image, context of {backend.context_length} tokens")
        """
    ),
    md("## The seed question"),
    code(
        """
        from langchain_core.messages import HumanMessage

        from mantis_llm.langchain import image_block

        IMAGES = Path("images")
        day, night = IMAGES / "house_day.png", IMAGES / "house_night.png"

        message = HumanMessage(content=[image_block(day), image_block(night),
                                        {"type": "text", "text": "What are the differences between these two images?"}])
        answer = chat.invoke([message])
        print(repr(answer.content))
        print(answer.usage_metadata)  # the local backend counts tokens
        print(answer.response_metadata["finish_reason"], answer.response_metadata["metrics"])
        """
    ),
    md(
        """
        ## Streaming

        Locally, `stream()` yields text as each token is generated (stop sequences are applied on the
        fly):
        """
    ),
    code(
        """
        t = time.perf_counter()
        first = None
        pieces = []
        for chunk in chat.stream([message]):
            first = first or time.perf_counter() - t
            pieces.append(chunk.content)
        elapsed = time.perf_counter() - t
        print(pieces)
        print(f"first token after {first:.2f}s, {len(pieces) - 1} chunks in {elapsed:.2f}s")
        """
    ),
    md(
        """
        ## Batching

        Requests that arrive together are generated as one left-padded batch (one vision pass for all
        their images), and each request returns as soon as its own row is done. `abatch` (or many
        concurrent `ainvoke`s, or threads calling `invoke`) gets this for free; greedy answers are the
        same as one by one. (On the tiny model and a shared CPU the wall time says little; on a GPU,
        batching is where throughput comes from, see the notes below.)
        """
    ),
    code(
        """
        questions = ["What are the differences between these two images?", "Which image shows night?",
                     "Describe the first image.", "How many windows are lit?"]
        inputs = [[HumanMessage(content=[image_block(day), image_block(night), {"type": "text", "text": q}])] for q in questions]

        t = time.perf_counter()
        batched = await chat.abatch(inputs)
        print(f"{len(batched)} answers in {time.perf_counter() - t:.2f}s")
        print("batch size each request ran in:", [b.response_metadata["metrics"]["batch_size"] for b in batched])

        one_by_one = [await chat.ainvoke(m) for m in inputs]
        print("same answers as one by one:", [a.content for a in one_by_one] == [b.content for b in batched])
        """
    ),
    md(
        """
        ## LlamaIndex, sharing the loaded model

        A `Backend` instance can be handed to any adapter, so LangChain and LlamaIndex share one copy
        of the weights (a model you pass in is yours to close):
        """
    ),
    code(
        """
        from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock

        from mantis_llm.llama_index import Mantis

        llm = Mantis(backend=backend, max_tokens=24)
        msg = ChatMessage(role="user", blocks=[ImageBlock(path=day), TextBlock(text="Describe this picture.")])
        print(repr(llm.chat([msg]).message.content))
        print([r.delta for r in llm.stream_complete("Describe this picture.", image_documents=[ImageBlock(path=night)])][:8], "...")
        """
    ),
    md(
        """
        ## Memory and speed: what to expect from the real 7B

        Mantis-llava-7b is a Vicuna-7B decoder, a CLIP ViT-L/14-336 vision tower and a projector.
        Estimates (arithmetic, not measurements: see the project's research notes):

        | | Mantis-llava-7b |
        |---|---|
        | weights | ~7.3 B parameters: **~14.5 GB in bf16**, ~29 GB in float32 (CPU) |
        | image cost | **576 tokens per image** (+ ~10 wrapper tokens) |
        | context | 4096 tokens: **about 6 images** with a short answer |
        | KV cache | ~0.5 MB per token: ~2 GB for a full 4096-token sequence |
        | prefill (2 images + text, ~1.3k tokens) | ~18 TFLOP: tens of ms on an A100/H100 |

        Decoding one sequence is memory-bandwidth bound: the ceiling is roughly bandwidth / weight bytes,
        about **230 tok/s on an H100 SXM, 140 on an A100-80G, 70 on an RTX 4090, 40 on an A10G**; plain
        transformers (sdpa, no compile) typically reaches well under half of that at batch size 1.
        Batching raises total throughput nearly linearly until compute-bound, at ~2 GB of KV cache per
        full-length sequence. So: a 24 GB GPU holds the bf16 model plus a few concurrent requests; a
        16 GB GPU is too small for bf16; on CPU expect seconds per token.

        The measured numbers above are for the tiny model on this machine's CPU and only show that the
        path works.
        """
    ),
    md("## Clean up\n\n`close()` frees the weights and stops the worker thread."),
    code(
        """
        chat.close()  # the backend chat built: frees the model and stops its worker
        print("loaded after close:", backend.loaded)
        """
    ),
]


def main() -> None:
    books = {
        "01_quickstart.ipynb": QUICKSTART,
        "02_langchain_agent_with_images.ipynb": AGENT,
        "03_llamaindex_rag_with_images.ipynb": RAG,
        "04_local_backend.ipynb": LOCAL,
    }
    for name, cells in books.items():
        nb = notebook(cells)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {name} ({len(cells)} cells)")


if __name__ == "__main__":
    main()
