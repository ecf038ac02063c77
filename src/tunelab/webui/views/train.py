"""Train: the config form (from the schema), dataset preview, memory estimate, YAML + CLI, start/stop/resume."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from tunelab.config import DEFAULT_METHOD, build_config, method_config_classes
from tunelab.errors import TunelabError
from tunelab.webui.form import (COMMON_SECTIONS, FormField, cli_command, config_tree, defaults, follow_defaults,
                                schema_fields, text_box, to_yaml, visible_keys, widget_value)
from tunelab.webui.preview import SUPERVISED, dataset_names, preview
from tunelab.webui.views.common import CODE_LINES, FIELD_CLASS, Services, failure

#: Keys edited by dedicated controls above the form.
_CONTROLS = ("method.type", "stage", "output_dir")
#: List keys picked from the dataset registry (paths can be typed too).
_DATASET_KEYS = ("data.train", "data.eval")


def _info(field: FormField, default: Any) -> str:
    shown = "empty" if default is None or default == "" else json.dumps(default)
    return f"{field.type_label}; default {shown}. {field.help}".strip()


def _widget(field: FormField, default: Any, visible: bool, dataset_choices: list[str]) -> gr.components.Component:
    common = dict(label=field.name, info=_info(field, default), visible=visible, elem_classes=[FIELD_CLASS],
                  elem_id=f"cfg-{field.key.replace('.', '-')}")
    if field.key in _DATASET_KEYS:
        return gr.Dropdown(choices=dataset_choices, value=default or [], multiselect=True, allow_custom_value=True,
                           **common)
    if field.kind == "bool":
        return gr.Checkbox(value=default, **common)
    if field.kind == "choice":
        choices = [*([""] if field.nullable else []), *field.choices]
        return gr.Dropdown(choices=choices, value="" if default is None else default, **common)
    if field.kind in ("int", "float") and not text_box(field):
        return gr.Number(value=default, precision=0 if field.kind == "int" else None, **common)
    return gr.Textbox(value=widget_value(field, default), max_lines=1, **common)


def _section_shown(section: str, keys: set[str]) -> bool:
    return any(key.startswith(f"{section}.") for key in keys)


def _raw(field: FormField, value: Any) -> Any:
    """A widget's value in the form :func:`config_tree` reads (dataset pickers hold lists)."""
    return json.dumps(value or []) if field.key in _DATASET_KEYS else value


def build(services: Services) -> gr.Code:
    """The Train tab; returns its YAML box (the Compare view starts from it)."""
    fields = [f for f in schema_fields() if f.key not in _CONTROLS]
    first = defaults(DEFAULT_METHOD, "sft")
    for method_type in method_config_classes():  # hidden keys start at their own type's defaults
        first = {**defaults(method_type, "sft"), **first}
    method_choices = next(f.choices for f in schema_fields() if f.key == "method.type")
    stage_choices = next(f.choices for f in schema_fields() if f.key == "stage")
    shown = visible_keys(first["method.type"], first["stage"])
    names = dataset_names(first["data.dataset_dir"])

    with gr.Row():
        method = gr.Dropdown(choices=list(method_choices), value=first["method.type"], label="method",
                             elem_id="train-method")
        stage = gr.Dropdown(choices=list(stage_choices), value=first["stage"], label="stage", elem_id="train-stage")
        name = gr.Textbox(label="run name", placeholder="empty: <stage>-<method>-<time>", elem_id="train-name")
    widgets: list[gr.components.Component] = []
    section_boxes: list[tuple[str, gr.Accordion]] = []
    for section in dict.fromkeys(f.section for f in fields):
        with gr.Accordion(section, open=section in COMMON_SECTIONS, visible=_section_shown(section, shown)) as box:
            with gr.Row(equal_height=False):
                for f in (f for f in fields if f.section == section):
                    widgets.append(_widget(f, first.get(f.key), f.key in shown, names))
        section_boxes.append((section, box))

    with gr.Row():
        preview_button = gr.Button("Preview data", elem_id="train-preview")
        estimate_button = gr.Button("Estimate memory", elem_id="train-estimate")
        start_button = gr.Button("Start", variant="primary", elem_id="train-start")
        stop_button = gr.Button("Stop", elem_id="train-stop")
        resume_button = gr.Button("Resume", elem_id="train-resume")
    message = gr.Markdown(elem_id="train-message")
    last_run = gr.State("")
    chosen = gr.State((first["method.type"], first["stage"]))  # the method type and stage the form shows
    samples = gr.HighlightedText(label="first records, as rendered for training (highlighted: trained on)",
                                 color_map={SUPERVISED: "green"}, combine_adjacent=True, elem_id="train-samples")
    memory = gr.Code(label="memory estimate", language=None, interactive=False, elem_id="train-memory")
    start_tree = config_tree({}, first["method.type"], first["stage"])
    with gr.Row():
        yaml_box = gr.Code(to_yaml(start_tree), label="run.yaml", language="yaml", interactive=False,
                           lines=12, max_lines=CODE_LINES, elem_id="train-yaml")
        command = gr.Code(cli_command(start_tree), label="equivalent command", language="shell", interactive=False,
                          lines=12, max_lines=CODE_LINES, elem_id="train-cli")

    inputs = [method, stage, *widgets]

    def tree_of(method_type: str, stage_name: str, *values: Any) -> dict[str, Any]:
        return config_tree({f.key: _raw(f, v) for f, v in zip(fields, values)}, method_type, stage_name)

    def show_yaml(*args: Any) -> tuple[str, str]:
        try:
            tree = tree_of(*args)
        except Exception as err:  # a half-typed YAML value: say so where the YAML would be
            return f"# not valid yet: {err}", ""
        return to_yaml(tree), cli_command(tree)

    def switch(before: tuple[str, str], method_type: str, stage_name: str, *values: Any) -> list[Any]:
        """Show this method's and stage's keys; values left at their old defaults take the new ones."""
        keys = visible_keys(method_type, stage_name)
        base = defaults(method_type, stage_name)
        raw = {f.key: _raw(f, v) for f, v in zip(fields, values)}
        moved = follow_defaults(raw, tuple(before), (method_type, stage_name))
        updates: list[Any] = []
        for f in fields:
            change: dict[str, Any] = dict(visible=f.key in keys, info=_info(f, base.get(f.key)))
            if moved[f.key] != raw[f.key]:
                change["value"] = json.loads(moved[f.key]) if f.key in _DATASET_KEYS else moved[f.key]
            updates.append(gr.update(**change))
        updates += [gr.update(visible=_section_shown(section, keys)) for section, _ in section_boxes]
        return [*updates, (method_type, stage_name)]

    def show_preview(*args: Any) -> Any:
        try:
            cfg = build_config(tree_of(*args), source="form")
            if not cfg.data.train:
                raise TunelabError("pick a dataset under data → train first.")
            pieces: list[tuple[str, str | None]] = []
            for number, record in enumerate(preview(cfg, cfg.data.train[0]), 1):
                pieces += [(f"\n── {cfg.data.train[0]} record {number} ──\n", None), *record]
            return pieces, ""
        except TunelabError as err:
            return [], failure(err)

    def show_estimate(*args: Any) -> tuple[str, str]:
        from tunelab.estimate import estimate, format_table, parse_target

        try:
            cfg = build_config(tree_of(*args), source="form")
            return format_table(estimate(cfg, parse_target(None)).to_dict()), ""
        except TunelabError as err:
            return "", failure(err)

    def start(run_name: str, *args: Any) -> tuple[str, str]:
        try:
            run_id = services.runs.submit(tree_of(*args), run_name.strip() or None)
        except TunelabError as err:
            return "", failure(err)
        view = services.runs.view(run_id)
        return run_id, f"Run **{run_id}** is {view.status}. Watch it in the Runs tab."

    def stop(run_id: str) -> str:
        if not run_id:
            return "No run started from this page yet; stop runs in the Runs tab."
        try:
            return f"Run **{run_id}** is {services.runs.stop(run_id).status} (a running run checkpoints, then stops)."
        except TunelabError as err:
            return failure(err)

    def resume(run_id: str) -> str:
        if not run_id:
            return "No run started from this page yet; resume runs in the Runs tab."
        try:
            return f"Run **{run_id}** is {services.runs.resume(run_id).status}."
        except TunelabError as err:
            return failure(err)

    def refresh_datasets(directory: str) -> list[Any]:
        choices = dataset_names(directory)
        return [gr.update(choices=choices) for _ in _DATASET_KEYS]

    dataset_widgets = [w for f, w in zip(fields, widgets) if f.key in _DATASET_KEYS]
    dataset_dir = next(w for f, w in zip(fields, widgets) if f.key == "data.dataset_dir")
    dataset_dir.blur(refresh_datasets, dataset_dir, dataset_widgets)
    for control in (method, stage):
        control.input(switch, [chosen, *inputs], [*widgets, *[box for _, box in section_boxes], chosen]) \
            .then(show_yaml, inputs, [yaml_box, command])
    # always_last: typing while the YAML is being made must still end with the YAML of the last keystroke
    gr.on([w.input for w in widgets], show_yaml, inputs, [yaml_box, command], trigger_mode="always_last",
          show_progress="hidden")
    preview_button.click(show_preview, inputs, [samples, message])
    estimate_button.click(show_estimate, inputs, [memory, message])
    start_button.click(start, [name, *inputs], [last_run, message])
    stop_button.click(stop, last_run, message)
    resume_button.click(resume, last_run, message)
    return yaml_box
