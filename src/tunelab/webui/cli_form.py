"""The options of a ``tunelab`` sub-command, read from the command itself, and the argv a form makes of them.

The Evaluate, Predict, Export and Compare views launch the CLI, so their forms are built
from the click parameters of those commands (name, flag, default, help): an option added
to a command appears in its view without a change here. Only click's public attributes
are used, by duck typing: typer ships its own copy of click, so the classes are not
``click``'s.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class CliParam:
    """One argument or option of a command."""

    name: str
    flag: str | None  # "--out"; None for a positional argument
    negative: str | None  # "--no-compare-base" / "--greedy" for on/off options
    default: Any
    help: str
    required: bool
    many: bool  # several values (variadic argument or repeatable option), written space-separated
    is_flag: bool

    @property
    def label(self) -> str:
        return self.flag or self.name


def command_params(cli: Any, name: str) -> list[CliParam]:
    """The parameters of ``tunelab NAME`` as click sees them; ``cli`` is the ``tunelab`` typer app.

    The CLI hands itself to the web UI (``tunelab webui``), so the UI never imports the
    module that starts it.
    """
    import typer

    group = typer.main.get_command(cli)
    command = getattr(group, "commands", {}).get(name)
    if command is None:
        raise TunelabError(f"tunelab has no '{name}' command.")
    params = []
    for param in command.params:
        is_option = param.param_type_name == "option"
        default = param.default if not callable(param.default) else None
        params.append(CliParam(
            name=param.name or "", flag=param.opts[0] if is_option else None,
            negative=(param.secondary_opts or [None])[0] if is_option else None,
            default=default, help=getattr(param, "help", None) or "", required=param.required,
            many=param.multiple or param.nargs == -1, is_flag=bool(getattr(param, "is_flag", False))))
    return params


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def build_argv(name: str, params: list[CliParam], values: dict[str, Any]) -> list[str]:
    """``[name, args..., --options...]`` for the form ``values`` (by parameter name).

    Options equal to their default are left out, so the command reads as a user would
    type it; a missing required value is an error naming the option.
    """
    positional: list[str] = []
    options: list[str] = []
    for param in params:
        value = values.get(param.name)
        if param.is_flag:
            if value is not None and value != param.default:
                chosen = param.flag if value else param.negative
                if chosen:
                    options.append(chosen)
            continue
        if _blank(value):
            if param.required:
                raise TunelabError(f"tunelab {name}: {param.label} is required ({param.help or 'no help'}).")
            continue
        if isinstance(value, float) and value.is_integer() and isinstance(param.default, int):
            value = int(value)  # number fields hand back floats
        if param.flag is not None and str(value) == str(param.default):
            continue
        items = shlex.split(str(value)) if param.many else [str(value)]
        if param.flag is None:
            positional.extend(items)
        else:
            for item in items:
                options.extend([param.flag, item])
    return [name, *positional, *options]
