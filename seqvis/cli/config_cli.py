"""``--config=FILE.py[:ARG]`` and ``--config.a.b=VALUE`` on a command line: loading, and saying what is wrong.

ml_collections' ``config_flags`` parses the overrides of ``seqvis.cli.train``; when one cannot apply it raises
from deep inside the flag parser (a ``KeyError`` with a suggestion, an ``AttributeError``, a parse error).
:func:`explain_flag_error` turns that into one line naming the override, what the config has there, and
the nearest field name.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any, Sequence

from seqvis.errors import ConfigError


def config_spec(argv: Sequence[str]) -> str | None:
    """The value of ``--config=SPEC`` (or ``--config SPEC``) in ``argv``."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``[("model.depth", "4"), ...]`` for each ``--config.KEY=VALUE`` in ``argv``, in order."""
    out = []
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            key, value = a[len("--config."):].split("=", 1)
            out.append((key, value))
    return out


def load_config(spec: str, flag: str = "--config"):
    """``"configs/vit.py:Ti/4"`` -> the ConfigDict its ``get_config(arg)`` returns."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"{flag}={spec}: there is no file {path!r}; e.g. {flag}=configs/vit.py.")
    module_spec = importlib.util.spec_from_file_location("_seqvis_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{flag}={spec}: {path} defines no get_config(arg).")
    return module.get_config(arg) if arg else module.get_config()


def override_problem(config: Any, key: str, value: str | None = None) -> str | None:
    """Why ``--config.KEY=VALUE`` cannot apply to ``config``: a field it does not have, or a value that is
    not of the field's type. None if it can."""
    parts = key.split(".")
    node, where = config, "the config"
    for j, part in enumerate(parts):
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        if part not in fields:
            near = difflib.get_close_matches(part, fields, n=1)
            hint = f" (did you mean {'.'.join(parts[:j] + near)!r}?)" if near else ""
            listing = f"; it has: {', '.join(fields)}" if fields else ""
            if j >= 1 and not near:  # ml_collections overrides change a field, never add one
                parent = ".".join(parts[:j])
                listing += (f"; a dotted path cannot add a field to {where}: give it whole with the new entry, "
                            f"--config.{parent}=\"{{...}}\"")
                if parent == "evals":
                    listing += (", e.g. --config.evals=\"{'NAME': {'type': 'fewshot', 'dataset': 'fashion_mnist'}}\", "
                                "or a config argument that adds it (configs/vit.py:fewshot; fields: "
                                "seqvis/train/evaluators.py)")
            return f"{where} has no field {part!r}{hint}{listing}"
        node, where = node[part], "config." + ".".join(parts[:j + 1])
    if value is not None and isinstance(node, (bool, int, float)) and not _parses_as(value, type(node)):
        kind = {bool: "True or False", int: "a whole number", float: "a number"}[type(node)]
        return f"{where} is {kind} (now {node!r}); give {kind}, e.g. --config.{key}={node!r}"
    return None


def _parses_as(value: str, kind: type) -> bool:
    if kind is bool:
        return value.lower() in ("true", "false", "1", "0")
    try:
        kind(value)
    except ValueError:
        return False
    return True


def explain_flag_error(argv: Sequence[str], error: BaseException) -> str:
    """One line for a command line that ``config_flags`` refused: the override at fault and the fix."""
    spec = config_spec(argv)
    text = " ".join(t.strip() for t in str(error).replace("\\n", "\n").splitlines()).strip(" '\"")
    if spec is None:
        return f"{text}. Usage: --config=configs/FILE.py[:ARG] --workdir=DIR [--config.a.b=VALUE ...]"
    try:
        config = load_config(spec)
    except ConfigError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - the config file itself fails: say so, with its own error
        return f"--config={spec}: loading the config failed: {type(e).__name__}: {e}"
    for key, value in overrides(argv):
        problem = override_problem(config, key, value)
        if problem is not None:
            return f"--config.{key}={value}: {problem}."
    return f"{text} (in the --config.* overrides of --config={spec})."
