"""Chat: a finished run (or its base), streamed, with generation controls; optionally a second model beside it."""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from tunelab.data.records import Message
from tunelab.errors import TunelabError
from tunelab.inference import GenerationOptions
from tunelab.webui.chat import BASE
from tunelab.webui.views.common import Services

NONE = "none"
TUNED = "tuned"


def text_of(content: Any) -> str:
    """A chat message's text: Gradio hands content back as a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def to_messages(history: list[dict[str, Any]], system: str | None) -> list[Message]:
    messages = [Message("system", system)] if system and system.strip() else []
    return messages + [Message(turn["role"], text_of(turn["content"])) for turn in history
                       if turn.get("role") in ("user", "assistant")]


def build(services: Services, page: gr.Blocks) -> None:
    with gr.Row():
        run = gr.Dropdown(label="run", choices=[], elem_id="chat-run", scale=2)
        left = gr.Dropdown(label="left: answer with", choices=[TUNED, BASE], value=TUNED, elem_id="chat-left")
        right = gr.Dropdown(label="right: side by side with", choices=[NONE, BASE], value=NONE, elem_id="chat-right")
        refresh = gr.Button("Refresh runs", elem_id="chat-refresh", scale=1)
    with gr.Row():
        left_box = gr.Chatbot(label="left", height=360, elem_id="chat-left-box")
        right_box = gr.Chatbot(label="right", height=360, elem_id="chat-right-box")
    prompt = gr.Textbox(label="message (Enter to send)", elem_id="chat-input")
    with gr.Accordion("generation", open=False):
        with gr.Row():
            system = gr.Textbox(label="system prompt", elem_id="chat-system")
            max_new_tokens = gr.Slider(1, 2048, value=128, step=1, label="max new tokens", elem_id="chat-max")
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="top p")
            top_k = gr.Slider(0, 200, value=50, step=1, label="top k")
            repetition_penalty = gr.Slider(1, 2, value=1.0, step=0.05, label="repetition penalty")
            seed = gr.Number(value=0, precision=0, label="seed")
    clear = gr.Button("Clear", elem_id="chat-clear")
    message = gr.Markdown(elem_id="chat-message")

    def runs_changed(current: str | None) -> list[Any]:
        finished = services.runs.finished()
        chosen = current if current in finished else (finished[0] if finished else None)
        return [gr.update(choices=finished, value=chosen),
                gr.update(choices=[NONE, BASE, *[r for r in finished if r != chosen]])]

    def send(text: str, run_id: str | None, left_model: str, right_model: str, left_history: list, right_history: list,
             system_prompt: str, *settings: Any) -> Iterator[tuple[Any, ...]]:
        if not run_id:
            yield left_history, right_history, text, "Choose a finished run first (train one in the Train tab)."
            return
        options = GenerationOptions(max_new_tokens=int(settings[0]), temperature=settings[1], top_p=settings[2],
                                    top_k=int(settings[3]), repetition_penalty=settings[4], seed=int(settings[5]))
        models = [run_id if left_model == TUNED else BASE] + ([right_model] if right_model != NONE else [])
        histories = [list(left_history or []), list(right_history or [])]
        answers = ["", ""]

        def shown(note: str = "") -> tuple[Any, ...]:
            """Fresh lists on every update: Gradio streams each one as a difference from the one before."""
            boxes = [[*history, {"role": "user", "content": text}, {"role": "assistant", "content": answer}]
                     if index < len(models) else history
                     for index, (history, answer) in enumerate(zip(histories, answers))]
            return boxes[0], boxes[1], "", note

        try:
            for index, choice in enumerate(models):
                asked = to_messages([*histories[index], {"role": "user", "content": text}], system_prompt)
                for piece in services.chat.stream(run_id, choice, asked, options):
                    answers[index] += piece
                    yield shown()
        except TunelabError as err:
            yield shown(f"**error:** {err}")
            return
        yield shown()

    gr.on([page.load, refresh.click, run.focus, run.input], runs_changed, run, [run, right])
    prompt.submit(send, [prompt, run, left, right, left_box, right_box, system, max_new_tokens, temperature, top_p,
                         top_k, repetition_penalty, seed], [left_box, right_box, prompt, message])
    clear.click(lambda: ([], []), None, [left_box, right_box])
