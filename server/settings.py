"""Where a ServerConfig comes from: flags, LORASERVE_* variables and a config file.

Precedence: flag > environment > file (`--config PATH` or LORASERVE_CONFIG; TOML, or YAML by
its .yaml/.yml suffix, in the tree's sections) > default. Flags and variables keep flat names,
one per field (`max_batch_size`: `--max-batch-size`, LORASERVE_MAX_BATCH_SIZE); this module maps
them onto the sections, and renders the CLI help and docs/operations.md's reference from them.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from loraserve.server.config import ServerConfig

ENV_PREFIX = "LORASERVE_"
FILE_ENV = ENV_PREFIX + "CONFIG"


def _sections() -> dict[str, type[BaseModel]]:
    return {name: field.annotation for name, field in ServerConfig.model_fields.items()}


def _flat() -> dict[str, str]:
    flat: dict[str, str] = {}
    for section, model in _sections().items():
        for name in model.model_fields:
            assert name not in flat, f"{name} is in both {flat[name]} and {section}: flat names must be unique"
            flat[name] = section
    return flat


FLAT = _flat()
"""Each field's flat name -> the section that holds it."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _is_switch(name: str) -> bool:
    return _sections()[FLAT[name]].model_fields[name].annotation is bool


def nested(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{flat name: value} as {section: {field: value}}; an unknown name is refused."""
    unknown = sorted(set(flat) - set(FLAT))
    if unknown:
        raise ValueError(f"invalid configuration: no setting named {', '.join(unknown)}")
    tree: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        tree.setdefault(FLAT[name], {})[name] = value
    return tree


def read_file(path: Path) -> dict[str, Any]:
    """A config file's sections: TOML, or YAML for a .yaml/.yml name."""
    import yaml  # only where a config file is read

    try:
        text = Path(path).read_text()
        tree = (yaml.safe_load(text) or {}) if Path(path).suffix in (".yaml", ".yml") else tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"invalid configuration: {path}: {exc}") from None
    if not isinstance(tree, dict) or not all(isinstance(v, dict) for v in tree.values()):
        raise ValueError(f"invalid configuration: {path} must hold sections ({', '.join(_sections())}) of fields")
    return tree


def _merge(*trees: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Later trees win, field by field."""
    merged: dict[str, dict[str, Any]] = {}
    for tree in trees:
        for section, fields in tree.items():
            merged.setdefault(section, {}).update(fields)
    return merged


def _problem(error: dict) -> str:
    """One of pydantic's errors as the flat names say it: `port='abc': Input should be ...`."""
    if not error["loc"]:  # the tree's own checks (ServerConfig._valid), every problem in one
        return str(error["ctx"]["error"]).removeprefix("invalid configuration: ")
    if error["type"] == "extra_forbidden":
        return f"no setting named {'.'.join(map(str, error['loc']))}"
    return f"{error['loc'][-1]}={error['input']!r}: {error['msg']}"


def validate(tree: Mapping[str, Any]) -> ServerConfig:
    """The sections validated once; every problem in one ValueError."""
    try:
        return ServerConfig.model_validate(tree)
    except ValidationError as exc:
        raise ValueError("invalid configuration: " + "; ".join(map(_problem, exc.errors()))) from None


def load(flags: Mapping[str, Any] = {}, env: Mapping[str, str] = os.environ,
         file: str | Path | None = None) -> ServerConfig:
    """`flags`: {flat name: value} (a flag's text, or a typed value; None = not given)."""
    file = file or env.get(FILE_ENV) or None
    from_env = {name: env[env_name(name)] for name in FLAT if env_name(name) in env}
    given = {name: value for name, value in flags.items() if value is not None}
    return validate(_merge(read_file(Path(file)) if file else {}, nested(from_env), nested(given)))


def replace(cfg: ServerConfig, **flat: Any) -> ServerConfig:
    """`cfg` with some fields changed by flat name, validated again."""
    return validate(_merge(cfg.model_dump(), nested(flat)))


def _default_text(value) -> str:
    if isinstance(value, bool):
        return "off" if not value else "on"
    if value in ("", (), None):
        return "—"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argparse group per section, each field's description its help."""
    parser.add_argument("--config", default=None, metavar="PATH",
                        help=f"Config file (TOML, or YAML by its .yaml/.yml suffix) in the sections below; flags "
                             f"and variables beat it [env {FILE_ENV}].")
    for section, model in _sections().items():
        group = parser.add_argument_group(f"{section} ([{section}] in a config file)", model.__doc__)
        for name, field in model.model_fields.items():
            if _is_switch(name):  # a switch on the command line; true/false in the environment
                group.add_argument(flag(name), dest=name, action="store_const", const="true", default=None,
                                   help=f"{field.description} [env {env_name(name)}=true]")
            else:
                group.add_argument(flag(name), dest=name, default=None,
                                   help=f"{field.description} [env {env_name(name)}; default "
                                        f"{_default_text(field.default)}]")


def from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> ServerConfig:
    return load({name: getattr(args, name, None) for name in FLAT}, env, getattr(args, "config", None))


def reference() -> str:
    """docs/operations.md's "## Configuration" section, up to the next one (tests/test_docs.py
    keeps the committed text equal to this)."""
    lines = [
        "## Configuration",
        "",
        "Flags (`loraserve serve --help`), `LORASERVE_*` environment variables, or a config file",
        f"(`--config PATH` or `{FILE_ENV}`: TOML, or YAML by its `.yaml`/`.yml` suffix) whose",
        "sections are the headings below. A flag beats the environment, which beats the file.",
        "Nonsense fails at start-up with every problem listed. Generated from `server/config.py`",
        "(`python -c 'from loraserve.server.settings import reference; print(reference())'`).",
        "",
        "```toml",
        "[scheduler]",
        "max_batch_size = 32",
        "",
        "[lora]",
        'pin = ["support"]',
        "```",
    ]
    for section, model in _sections().items():
        lines += ["", f"### {section}", "", model.__doc__, "", "| flag | env | default | meaning |",
                  "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            env = f"`{env_name(name)}=true`" if _is_switch(name) else f"`{env_name(name)}`"
            meaning = field.description.replace("|", "\\|")
            lines.append(f"| `{flag(name)}` | {env} | {_default_text(field.default)} | {meaning} |")
    return "\n".join(lines) + "\n"
