"""Installed plugins' config folders on the entry points' search path: a plugin package names its
config package in the ``vae_lightning.configs`` entry-point group (docs/plugins.md), and its
``model/net/<name>.yaml`` etc. then sit beside this project's, after them (the project's own win a
clash). Registered with Hydra by hand (``Plugins.register``) when an entry point imports this
module: Hydra's own discovery scans the ``hydra_plugins`` namespace package, which a setuptools
editable install (``make install``) does not let it list."""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from hydra_plugins.vae_lightning_replicas import ReplicaLauncher
from vae_lightning.registry import CONFIG_PATH, plugin_config_packages


class PluginConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not any(element.path == CONFIG_PATH for element in search_path.get_path()):
            return  # another Hydra app in this process
        for name, package in plugin_config_packages():
            search_path.append(provider=f"vae_lightning-plugin-{name}", path=f"pkg://{package}")


Plugins.instance().register(PluginConfigs)
Plugins.instance().register(ReplicaLauncher)  # hydra/launcher=replicas, found the same way
