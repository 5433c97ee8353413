"""Errors a user can cause and fix; entry points print them as one line."""

import difflib
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


class UserError(Exception):
    """Something the user can fix: the message says what happened and what to do."""


class DataError(UserError):
    """MNIST is missing, incomplete or corrupt."""


class DivergenceError(UserError):
    """The loss became NaN or infinite."""


def config_error_line(err: Exception) -> str:
    """One line for a config Hydra could not compose (a mistyped setting or preset, an override it
    cannot parse): what is wrong, and the nearest right name where there is one."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = err.__cause__
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        guess = difflib.get_close_matches(choice, err.options, n=1)
        hint = f"did you mean {group}={guess[0]}? " if guess else ""
        return f"{group}={choice} is not a preset; {hint}the presets of {group}: {', '.join(err.options)}"
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and cause.full_key and cause.parent_node is not None:
        parent, _, key = cause.full_key.rpartition(".")
        names = {".".join(filter(None, (parent, str(k)))): str(k) for k in cause.parent_node.keys()}
        if not parent:  # a setting written without its block (latent_dim=3): any block's
            every = _leaves(OmegaConf.to_container(cause.parent_node, resolve=False))
            names = {name: last for name, last in every if not name.startswith("hydra.")}
        guess = difflib.get_close_matches(key, names.values(), n=1)
        hint = f"did you mean {next(k for k, v in names.items() if v == guess[0])}? " if guess else ""
        return f"{cause.full_key} is not a setting; {hint}--cfg job prints every setting"
    # Hydra's two messages that list their fixes as numbered sentences (its wording, hydra 1.3)
    appended = re.search(r"An item is already at '([^']+)'.*remove \+ prefix: '([^']+)'", str(err), re.S)
    if appended:
        return f"{appended[1]} is already a setting: write {appended[2]} (a leading + adds a new setting)"
    ambiguous = re.search(r"Ambiguous value for argument '(([^=']+)=([^']+))'", str(err))
    if ambiguous:
        override, key, values = ambiguous.groups()
        return f"{override} gives several values: add -m to run one job for each, or write {key}=[{values}] for a list"
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("See https")]
    if isinstance(cause, OmegaConfBaseException):  # Hydra prints its message too: the first line says why
        lines.append(str(cause).splitlines()[0])
    if isinstance(err, OverrideParseException):
        return f"could not read an override ({'; '.join(lines)}); write each as key=value"
    return "; ".join(lines[: next((i for i, line in enumerate(lines) if line.startswith("Config search path")), None)])


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted name, last name) of every setting in a plain config, blocks first."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{prefix}{key}"
            yield name, str(key)
            yield from _leaves(value, name + ".")
