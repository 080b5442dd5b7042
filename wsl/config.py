"""One configuration system for every stage: OmegaConf structured configs (DINOv2's choice).

A stage's schema is a dataclass whose fields are `option(default, meaning, ...)` (a nested
dataclass is a section, `section(Schema, meaning)`). A config is the schema's defaults, then
YAML files (a file may start from another: `_base_: other.yaml`, relative to it), then
`key.sub=value` command-line overrides. OmegaConf merges them and rejects unknown keys and
wrong types; `validate` then checks each value against its field's `choices`, `minimum` or
`check`. Every problem is one `WslError` line naming the key, what was expected and what was given.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from wsl.errors import WslError
from wsl.files import write_atomic

T = TypeVar("T")
BASE_KEY = "_base_"
REQUIRED = MISSING  # the default of a key the user must set


def option(
    default: Any,
    meaning: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    above: float | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A config key: its default, a one-line meaning (shown by `--help`) and the values allowed.

    `minimum`/`above`: the value (each item of a list) must be >= / > it; `check(value)`
    returns what was expected when the value is wrong, else None.
    """
    metadata = {"help": meaning, "choices": choices, "minimum": minimum, "above": above, "check": check}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(schema: type, meaning: str) -> Any:
    """A nested section of a config, with its own schema."""
    return dataclasses.field(default_factory=schema, metadata={"help": meaning})


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """A YAML config over the file its `_base_` names (recursively)."""
    if not path.is_file():
        raise WslError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise WslError(f"{path}: `{BASE_KEY}` makes a cycle")
    try:
        node = OmegaConf.load(path)
    except Exception as exn:  # noqa: BLE001 - YAML syntax errors come in several types
        raise WslError(f"{path}: not a valid YAML mapping ({str(exn).splitlines()[0]})") from None
    if not OmegaConf.is_dict(node):
        raise WslError(f"{path}: a config must be a mapping of key: value")
    base = node.pop(BASE_KEY, None)
    if base is None:
        return node
    return OmegaConf.merge(_read_yaml(path.parent / str(base), (*seen, path.resolve())), node)


def _field_at(schema: type, key: str) -> dataclasses.Field | None:
    """The dataclass field of a dotted key, if the schema declares it."""
    found = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(schema):
            return None
        found = next((f for f in dataclasses.fields(schema) if f.name == part), None)
        if found is None:
            return None
        schema = typing.get_type_hints(schema).get(part)
    return found


def _keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def type_name(annotation: Any) -> str:
    """`int`, `list[float]`, `str | None`: a type as a user reads it."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None").replace("Optional[", "None | ")[:60]


def _explain(exn: OmegaConfBaseException, schema: type, given: str | None, where: str) -> str:
    key = getattr(exn, "full_key", None) or "?"
    if isinstance(exn, ConfigKeyError) or "not in" in str(exn).split("\n")[0]:
        close = difflib.get_close_matches(key, _keys(schema), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}unknown config key '{key}'{hint}; `--help` lists every key"
    if isinstance(exn, MissingMandatoryValue):
        return f"config key '{key}' is required: set {key}=..."
    found = _field_at(schema, key)
    hints = typing.get_type_hints(_owner(schema, key)) if found else {}
    expected = type_name(hints.get(found.name)) if found else "another type"
    got = f"'{given}'" if given is not None else f"({str(exn).splitlines()[0]})"
    return f"{where}config key '{key}': expected {expected}, got {got}"


def _owner(schema: type, key: str) -> type:
    """The dataclass that declares the last part of a dotted key."""
    for part in key.split(".")[:-1]:
        schema = typing.get_type_hints(schema)[part]
    return schema


def load(schema: type[T], files: list[str | Path] | tuple = (), overrides: list[str] | tuple = ()) -> T:
    """The config of a stage: defaults < YAML files < `key=value` overrides, checked."""
    config = OmegaConf.structured(schema)
    for path in files:
        try:
            config = OmegaConf.merge(config, _read_yaml(Path(path)))
        except OmegaConfBaseException as exn:
            raise WslError(_explain(exn, schema, None, f"{path}: ")) from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WslError(f"'{item}' is not key=value (e.g. max_steps=100)")
        try:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exn:
            raise WslError(_explain(exn, schema, value, "")) from None
    try:
        result = OmegaConf.to_object(config)
    except OmegaConfBaseException as exn:
        raise WslError(_explain(exn, schema, None, "")) from None
    validate(result)
    return result


def validate(config: Any, prefix: str = "") -> None:
    """Check every value against its field's `choices`, `minimum`, `above` and `check`."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
            continue
        meta = f.metadata
        if value is None:
            continue
        expected = None
        items = value if isinstance(value, (list, tuple)) else [value]
        if meta.get("choices") and value not in meta["choices"]:
            expected = "one of " + ", ".join(map(str, meta["choices"]))
        elif meta.get("minimum") is not None and any(v < meta["minimum"] for v in items):
            expected = f">= {meta['minimum']}"
        elif meta.get("above") is not None and any(v <= meta["above"] for v in items):
            expected = f"> {meta['above']}"
        elif meta.get("check"):
            expected = meta["check"](value)
        if expected:
            raise WslError(f"config key '{key}': expected {expected}, got {value!r}")


def to_dict(config: Any) -> dict:
    """A config as plain data, as its YAML reads back (tuples as lists): for W&B, checkpoints,
    release metadata and comparing runs."""
    return OmegaConf.to_container(OmegaConf.create(to_yaml(config)))


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def describe(schema: type, prefix: str = "") -> list[str]:
    """Every key of a schema with its type, default and meaning: `--help`'s list."""
    lines = []
    hints = typing.get_type_hints(schema)
    defaults = schema() if not any(f.default is MISSING for f in dataclasses.fields(schema)) else None
    for f in dataclasses.fields(schema):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            lines.append(f"{prefix}{f.name}:  {f.metadata.get('help', '')}")
            lines += describe(annotation, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = getattr(defaults, f.name, None)
        shown = "(required)" if default == MISSING else f"= {_yaml_value(default)}"
        lines.append(f"  {prefix}{f.name}: {type_name(annotation)} {shown}  {f.metadata.get('help', '')}")
    return lines


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    return str(value)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim.base_lr': 0.1, ...} of a nested mapping."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_run(run_dir: Path, config: Any, may_change: tuple[str, ...], command: str) -> None:
    """Refuse to continue a run directory under a config it was not run with.

    The first run writes `run_dir/config.yaml`; a later run into the same folder must match
    it on every key except `may_change` (keys, or sections ending in '.'), which it updates.
    """
    path = run_dir / "config.yaml"
    now = to_dict(config)
    if path.is_file():
        before = flatten(OmegaConf.to_container(OmegaConf.load(path)))
        after = flatten(now)
        changed = sorted(
            key
            for key in set(before) | set(after)
            if before.get(key, "<unset>") != after.get(key, "<unset>")
            and not any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in may_change)
        )
        if changed:
            shown = "; ".join(f"{k}: {before.get(k, '<unset>')} -> {after.get(k, '<unset>')}" for k in changed[:4])
            more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
            raise WslError(
                f"{run_dir} holds a run with another config ({shown}{more}): choose a new run_dir=..., "
                f"or restart=true to set the old run aside and start over (`wsl {command}`)"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, to_yaml(config))


def set_aside(run_dir: Path) -> Path | None:
    """`restart=true`: rename an existing run directory to RUN_DIR.N (nothing is deleted)."""
    if not run_dir.exists():
        return None
    n = 1
    while run_dir.with_name(f"{run_dir.name}.{n}").exists():
        n += 1
    target = run_dir.with_name(f"{run_dir.name}.{n}")
    run_dir.rename(target)
    return target


@dataclass
class WandbConfig:
    """The `wandb:` section."""

    project: str = option("wsl", "W&B project")
    mode: str = option(
        "offline",
        "offline (files under run_dir/wandb; `wandb sync` later), online or disabled",
        choices=("offline", "online", "disabled"),
    )


def require_file(path: str | None, key: str, what: str) -> Path:
    """An input file named by a config key, checked before any model or W&B run is made."""
    if not path:
        raise WslError(f"config key '{key}' is required: the {what}")
    if not Path(path).exists():
        raise WslError(f"{what} not found: {path} (config key '{key}')")
    return Path(path)
