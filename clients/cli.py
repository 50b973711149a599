"""The `flywheel` console script: one dispatcher over the components' subcommands.

Each subcommand lives in the package that owns it and exposes two things:
    Config: a pydantic model (every field has a description; it becomes a --flag with that help)
    run(config) -> int | None: does the work

A module with sub-subcommands (`flywheel eval compare`, `flywheel train convert`) exposes
    SUBCOMMANDS = {"compare": (CompareConfig, run_compare), ...}
next to its own Config/run, which stay the default.

The dispatcher imports the owning module only when its subcommand is called, so `flywheel serve`
never imports the trainer and `flywheel --help` stays fast. Process boundaries are package
boundaries: `flywheel up` starts the others as child processes of this same script.

Configuration precedence (lowest to highest): field defaults < YAML (`--config FILE`) <
environment (`FLYWHEEL_<COMMAND>_<FIELD>`, e.g. FLYWHEEL_SERVE_PORT=8001) < command-line flags.
A YAML file may hold the fields at the top level or under a key named after the command
(`serve:`, `sample:`, ...), so one loop.yaml can configure every component.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from flywheel.server.errors import UserError

# subcommand -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("flywheel.server.serve", "Serve a model: vLLM's OpenAI server plus Flywheel's routes."),
    "models": ("flywheel.server.models", "List (and prepare) the bundled offline models."),
    "sample": ("flywheel.sampler.cli", "Generate scored rollouts (grpo, rejection, distill) into Redis / JSONL."),
    "train": ("flywheel.trainer.cli", "Train (CPT, SFT, DPO, GRPO) on files or the rollout queue."),
    "eval": ("flywheel.clients.eval.cli", "Evaluate any OpenAI endpoint on offline benchmarks."),
    "perf": ("flywheel.clients.perf.cli", "Load-test any OpenAI endpoint."),
    "up": ("flywheel.clients.up", "Run the whole loop: redis, server, sampler, trainer, eval."),
    "report": ("flywheel.clients.report", "Write the HTML report of a run directory."),
}


# ---------------------------------------------------------------- pydantic model -> argparse


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Optional[X] -> (X, True); anything else -> (tp, False)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "") -> None:
    """One --flag per field; nested models become --section.field flags."""
    for name, field in model.model_fields.items():
        tp, _ = _unwrap_optional(field.annotation)
        dest = prefix + name
        help_text = field.description or ""
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            _add_model_arguments(parser, tp, prefix=dest + ".")
            continue
        if field.is_required():
            help_text += " (required)"
        else:
            default = field.get_default(call_default_factory=True)
            if default is not None and not isinstance(default, BaseModel):
                help_text += f" (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        origin = get_origin(tp)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("positional"):  # e.g. `flywheel eval compare RUN_A RUN_B`
            item_type = get_args(tp)[0] if origin in (list, tuple) and get_args(tp) else tp
            parser.add_argument(
                dest,
                nargs="*" if origin in (list, tuple) else "?",
                default=argparse.SUPPRESS,
                type=item_type if item_type in (int, float, str, Path) else str,
                help=help_text,
                metavar=name.upper(),
            )
            continue
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif origin in (list, tuple) and get_args(tp) and get_args(tp)[0] in (int, float, str):
            kwargs["nargs"] = "+"
            kwargs["type"] = get_args(tp)[0]
        elif origin in (dict, list, tuple):
            kwargs["type"] = json.loads
            kwargs["metavar"] = "JSON"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif tp is Path:
            kwargs["type"] = Path
        else:  # anything pydantic can coerce from a string
            kwargs["type"] = str
        parser.add_argument(_flag(dest), **kwargs)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1} -> {'a': {'b': 1}}"""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _env_values(model: type[BaseModel], env_prefix: str) -> dict[str, Any]:
    """FLYWHEEL_SERVE_MAX_MODEL_LEN=512 -> {'max_model_len': '512'}; nested: FLYWHEEL_TRAIN_GRPO__BETA."""
    values: dict[str, Any] = {}
    for key, raw in os.environ.items():
        if not key.startswith(env_prefix):
            continue
        path = key[len(env_prefix) :].lower().split("__")
        node: Any = model
        ok = True
        for part in path:
            fields = getattr(node, "model_fields", {})
            if part not in fields:
                ok = False
                break
            node, _ = _unwrap_optional(fields[part].annotation)
        if not ok:
            continue
        if get_origin(node) in (list, dict, tuple):
            raw = json.loads(raw)
        values[".".join(path)] = raw
    return _nest(values)


def load_yaml_section(path: Path, section: str) -> dict[str, Any]:
    """Read a YAML config; use the `section:` key when present, else the top level."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping")
    if isinstance(data.get(section), dict):
        return data[section]
    return data


def build_config(model: type[BaseModel], command: str, argv: list[str], prog: str, description: str = "") -> BaseModel:
    """Parse argv (+ YAML + env) into an instance of `model`, or raise UserError / exit on --help."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (model.__doc__ or "").strip())
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML file with these settings (flat, or under a key named after the command)",
    )
    _add_model_arguments(parser, model)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    values: dict[str, Any] = {}
    if config_file is not None:
        values = load_yaml_section(config_file, command.split()[0])
    values = _merge(values, _env_values(model, "FLYWHEEL_" + command.replace(" ", "_").upper() + "_"))
    values = _merge(values, _nest(args))
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise UserError(f"invalid setting {_flag(where)}: {first['msg']} (got {first.get('input')!r})") from None


# ---------------------------------------------------------------- dispatch


def _top_help() -> str:
    lines = ["usage: flywheel COMMAND [--help] [options]", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<8} {text}")
    lines.append("")
    lines.append("Run `flywheel COMMAND --help` for the options of a command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"flywheel: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    config_cls, run = module.Config, module.run
    name, description = command, COMMANDS[command][1]
    subcommands = getattr(module, "SUBCOMMANDS", {})
    if rest and rest[0] in subcommands:
        config_cls, run = subcommands[rest[0]]
        name, rest = f"{command} {rest[0]}", rest[1:]
        description = (run.__doc__ or "").strip().split("\n")[0]
    elif subcommands:
        description += f" Subcommands: {', '.join(subcommands)} (each with --help)."
    try:
        config = build_config(config_cls, name, rest, prog=f"flywheel {name}", description=description)
        code = run(config)
    except UserError as exc:  # the one place bad input becomes an exit code
        print(f"flywheel {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
