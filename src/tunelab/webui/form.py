"""The Train view's form, generated from the run config's schema.

Nothing about the config is written down here: the keys, their types, choices and help
come from ``RunConfig.model_json_schema()`` (and each method type's config class), which
sections a stage reads from each section's ``stages``, and the defaults (which depend on
the method type and the stage) from validating ``{"method": {"type": T}, "stage": S}``. A
key added to the config appears in the form; a method's own keys appear when that method
is chosen. The form hands back only what differs from the defaults, so the YAML it shows
is the short file a user would write.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from tunelab.config import RunConfig, Section, method_config_classes

Kind = Literal["bool", "choice", "int", "float", "text", "yaml"]

#: Sections every run uses, in display order; other sections belong to particular stages.
COMMON_SECTIONS = ("model", "method", "data", "train")
#: Top-level keys that are edited apart from the form's sections.
TOP_LEVEL = ("stage", "output_dir")


@dataclass(frozen=True)
class FormField:
    """One config key as the form shows it."""

    key: str  # dotted: "train.lr"
    kind: Kind
    help: str
    type_label: str  # "integer > 0, or empty"
    choices: tuple[Any, ...] = ()
    nullable: bool = False

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]


# ---------------------------------------------------------------------------- schema

def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    return node


def _bounds(node: dict[str, Any]) -> str:
    parts = [f"{symbol} {node[key]}" for key, symbol in
             (("exclusiveMinimum", ">"), ("minimum", ">="), ("exclusiveMaximum", "<"), ("maximum", "<="))
             if key in node]
    return " ".join(parts)


def _describe(prop: dict[str, Any], defs: dict[str, Any]) -> tuple[Kind, tuple[Any, ...], bool, str]:
    """(kind, choices, nullable, type label) of one property schema."""
    prop = _resolve(prop, defs)
    options = [_resolve(option, defs) for option in (prop.get("anyOf") or prop.get("oneOf") or [prop])]
    nullable = any(option.get("type") == "null" for option in options)
    rest = [option for option in options if option.get("type") != "null"]
    suffix = ", or empty" if nullable else ""
    if len(rest) == 1:
        only = rest[0]
        if "enum" in only or "const" in only:
            choices = tuple(only.get("enum") or [only["const"]])
            return "choice", choices, nullable, "one of " + ", ".join(map(str, choices)) + suffix
        simple = {"boolean": "bool", "integer": "int", "number": "float", "string": "text"}
        if only.get("type") in simple and not (only.get("type") == "boolean" and nullable):
            label = f"{only['type']} {_bounds(only)}".strip()
            return simple[only["type"]], (), nullable, label + suffix  # type: ignore[return-value]
    alternatives = " | ".join(str(option.get("type", option.get("const", "value"))) for option in rest)
    return "yaml", (), nullable, f"YAML ({alternatives}){suffix}"


def _section_fields(section: str, schema: dict[str, Any], into: dict[str, FormField]) -> None:
    """Add the keys of one section's schema (a pydantic model's ``model_json_schema()``)."""
    defs = schema.get("$defs", {})
    for name, prop in schema.get("properties", {}).items():
        key = f"{section}.{name}"
        if key not in into:
            kind, choices, nullable, label = _describe(prop, defs)
            help_text = str(_resolve(prop, defs).get("description", "")).split("\n")[0]
            into[key] = FormField(key, kind, help_text, label, choices, nullable)


@functools.lru_cache(maxsize=1)
def schema_fields() -> tuple[FormField, ...]:
    """Every key of every section, sections in display order; the method section of every type.

    The method section is validated with the config class of its ``type``
    (:func:`tunelab.config.method_config_class`), so its keys come from each class's schema.
    """
    schema = RunConfig.model_json_schema()
    defs = schema.get("$defs", {})
    props = schema["properties"]
    sections = [s for s in COMMON_SECTIONS if s in props] + [s for s in props if s not in COMMON_SECTIONS]
    fields: dict[str, FormField] = {}
    classes = method_config_classes()
    for section in sections:
        if section == "method":
            for cls in dict.fromkeys(classes.values()):
                _section_fields(section, cls.model_json_schema(), fields)
            fields["method.type"] = replace(fields["method.type"], kind="choice", choices=tuple(classes),
                                            type_label="one of " + ", ".join(classes))
        elif _resolve(props[section], defs).get("type") == "object":
            _section_fields(section, {"$defs": defs, **_resolve(props[section], defs)}, fields)
    for key in TOP_LEVEL:
        if key in props:
            kind, choices, nullable, label = _describe(props[key], defs)
            fields[key] = FormField(key, kind, str(props[key].get("description", "")), label, choices, nullable)
    return tuple(fields.values())


def field_by_key() -> dict[str, FormField]:
    return {f.key: f for f in schema_fields()}


# ---------------------------------------------------------------------------- defaults and visibility

@functools.lru_cache(maxsize=64)
def _default_tree(method_type: str, stage: str) -> dict[str, Any]:
    """The resolved config of a run that only names its method type and stage."""
    for tree in ({"method": {"type": method_type}, "stage": stage}, {"method": {"type": method_type}}):
        try:
            return RunConfig.model_validate(tree).model_dump(mode="json")
        except ValidationError:  # a stage whose required keys have no default: its defaults still show
            continue
    return RunConfig().model_dump(mode="json")


def defaults(method_type: str, stage: str) -> dict[str, Any]:
    """Dotted key -> default value for this method type and stage."""
    flat: dict[str, Any] = {}
    for section, value in _default_tree(method_type, stage).items():
        if isinstance(value, dict):
            flat.update({f"{section}.{name}": item for name, item in value.items()})
        else:
            flat[section] = value
    return flat


def stage_sections(stage: str) -> set[str]:
    """The config sections ``stage`` reads: those that declare no stages, and those that name it."""
    return {name for name, field in RunConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
            and (not field.annotation.stages or stage in field.annotation.stages)}


def visible_keys(method_type: str, stage: str) -> set[str]:
    """Keys the form shows: this method type's keys, the sections this stage reads, the top-level keys."""
    wanted = stage_sections(stage) | {"method"} | set(TOP_LEVEL)
    return {key for key in defaults(method_type, stage) if key.partition(".")[0] in wanted}


def follow_defaults(values: dict[str, Any], before: tuple[str, str], after: tuple[str, str]) -> dict[str, Any]:
    """Widget values after switching (method type, stage) from ``before`` to ``after``.

    A value the user left at its old default takes the new default (the RL stages have
    their own learning rate; method types their own ranks); an edited value is kept.
    """
    old, new = defaults(*before), defaults(*after)
    fields = field_by_key()
    return {key: widget_value(fields[key], new[key])
            if key in new and (key not in old or parse_widget(fields[key], raw) == old[key]) else raw
            for key, raw in values.items()}


# ---------------------------------------------------------------------------- values

def _load(text: str) -> Any:
    """A typed value: JSON first (what the form writes; PyYAML reads ``5e-05`` as text), else YAML."""
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)


def text_box(field: FormField) -> bool:
    """Numbers that may be empty are typed as text: a number widget cannot hold "empty"."""
    return field.nullable and field.kind in ("int", "float")


def widget_value(field: FormField, value: Any) -> Any:
    """A config value as its widget holds it (YAML text for lists and unions, "" for empty text)."""
    if field.kind == "yaml":
        if value is None:
            return ""
        plain = isinstance(value, str) and _load(value) == value  # all-linear, not "all-linear"
        return value if plain else json.dumps(value)  # JSON is YAML, on one line
    if field.kind == "text" or text_box(field):
        return "" if value is None else str(value)
    return value


def parse_widget(field: FormField, raw: Any) -> Any:
    """A widget's value as a config value (what :func:`widget_value` wrote, read back)."""
    if field.kind == "yaml" or text_box(field):
        return _load(str(raw or ""))
    if field.kind == "text":
        return None if field.nullable and not str(raw or "").strip() else str(raw or "")
    if field.kind == "int" and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if field.kind == "choice" and raw == "" and field.nullable:
        return None
    return raw


def config_tree(values: dict[str, Any], method_type: str, stage: str) -> dict[str, Any]:
    """The config a form describes: method type, stage, and every shown key that differs from its default.

    ``values`` maps dotted keys to widget values; keys hidden for this method or stage are
    ignored, so a value typed for another method never leaks into the run.
    """
    base = defaults(method_type, stage)
    shown = visible_keys(method_type, stage)
    fields = field_by_key()
    tree: dict[str, Any] = {"stage": stage, "method": {"type": method_type}}
    for key, raw in values.items():
        if key not in shown or key not in fields or key in ("stage", "method.type"):
            continue
        value = parse_widget(fields[key], raw)
        if value == base.get(key):
            continue
        section, _, name = key.partition(".")
        if name:
            tree.setdefault(section, {})[name] = value
        else:
            tree[section] = value
    return tree


def to_yaml(tree: dict[str, Any]) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, default_flow_style=None)


def cli_command(tree: dict[str, Any], file_name: str = "run.yaml") -> str:
    """Shell lines that write the YAML and train it: exactly what the Start button queues."""
    return f"cat > {file_name} <<'EOF'\n{to_yaml(tree)}EOF\ntunelab train {file_name}\n"
