"""Where parts are found: one registry per kind (nets, likelihoods, priors, objectives, datasets),
holding this package's own parts and those of installed plugins, and where the configs are.

A plugin is a package of the user's that names its parts in the entry-point groups
``vae_lightning.nets``, ``vae_lightning.likelihoods``, ``vae_lightning.priors``,
``vae_lightning.objectives`` and ``vae_lightning.datasets`` (``name = "module:object"``), and its
config folder in ``vae_lightning.configs`` (docs/plugins.md; examples/vae_resnet is one). Entry
points are Python's standard plugin mechanism, the one pytest's plugins use: installing the
package is the whole registration, and a checkpoint names its parts by these names only, never by an import
path, so a file cannot name code to run. A plugin cannot replace a part of this package: a
checkpoint's ``bernoulli`` always means this package's Bernoulli.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

# the entry points' primary configs: conf/ of the checkout, shipped as vae_lightning.conf (pyproject.toml)
CONFIG_PATH = "pkg://vae_lightning.conf"
CONFIG_GROUP = "vae_lightning.configs"

T = TypeVar("T")


class UnknownPart(ValueError):
    """A name no installed package registers for its kind; ``setting`` is the config key that chose it."""

    def __init__(self, registry: Registry, name: object, setting: str) -> None:
        self.kind, self.name, self.group = registry.kind, name, registry.group
        super().__init__(
            f"{setting}={name!r} is not one of {', '.join(registry.names())} (the installed {registry.kind}s; a "
            f"plugin's {registry.kind} needs its package installed, entry-point group {registry.group})"
        )


class Registry(Generic[T]):
    """The parts of one kind by name: this package's (``register``) first, then the installed
    plugins' (loaded on first use, so that a broken plugin costs only its own parts)."""

    def __init__(self, kind: str, setting: str) -> None:
        self.kind, self.setting = kind, setting
        self.group = f"vae_lightning.{kind}s"
        self._own: dict[str, T] = {}
        self._loaded: dict[str, T] = {}
        self._found: dict[str, EntryPoint] | None = None  # the installed plugins', read once

    def register(self, name: str) -> Callable[[T], T]:
        def add(part: T) -> T:
            self._own[name] = _named(part, name)
            return part

        return add

    def _plugins(self) -> dict[str, EntryPoint]:
        if self._found is None:  # every call scanned every installed distribution's metadata again
            found = {ep.name: ep for ep in entry_points(group=self.group)}
            for name in sorted(set(found) & set(self._own)):
                log.warning(f"the plugin {found[name].value} cannot replace this package's {self.kind} {name!r}: "
                            "ignored")  # fmt: skip
            self._found = {name: ep for name, ep in found.items() if name not in self._own}
        return self._found

    def names(self) -> list[str]:
        return [*self._own, *sorted(self._plugins())]

    def __iter__(self) -> Iterator[str]:  # the names, as a dict's keys
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._own or name in self._plugins())

    def get(self, name: object, setting: str | None = None) -> T:
        """The part called ``name``; an unknown name raises ``UnknownPart`` naming ``setting``."""
        if isinstance(name, str) and name in self._own:
            return self._own[name]
        if isinstance(name, str) and name not in self._loaded:
            plugin = self._plugins().get(name)
            if plugin is not None:
                try:
                    self._loaded[name] = _named(plugin.load(), name)
                except Exception as err:  # the plugin's own code: say which, in one line
                    raise ValueError(f"the {self.kind} {name!r} of the plugin {plugin.value} failed to load: "
                                     f"{type(err).__name__}: {err}") from None  # fmt: skip
        if isinstance(name, str) and name in self._loaded:
            return self._loaded[name]
        raise UnknownPart(self, name, setting or self.setting)


def _named(part: T, name: str) -> T:
    """A part class (a likelihood, prior or objective: ``name`` is declared on its base) knows the
    name it is registered or installed under, its one source: its messages and checkpoints use it."""
    if isinstance(part, type) and isinstance(getattr(part, "name", None), str):
        part.name = name
    return part


def plugin_config_packages() -> Iterator[tuple[str, str]]:
    """(name, package) of every installed plugin's config folder, for Hydra's search path."""
    for ep in sorted(entry_points(group=CONFIG_GROUP), key=lambda ep: ep.name):
        yield ep.name, ep.value
