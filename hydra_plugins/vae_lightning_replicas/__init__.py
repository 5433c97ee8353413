"""``hydra/launcher=replicas`` (vae_lightning.runs.replica_launcher). Hydra instantiates only
launchers whose class lives in the ``hydra_plugins`` package: this one delegates to the project's,
imported when a sweep starts, so that Hydra's scan of this package stays light."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.plugins.launcher import Launcher


class ReplicaLauncher(Launcher):
    def __init__(self, **settings: Any) -> None:
        from vae_lightning.runs.replica_launcher import ReplicaLauncher as Implementation

        self.launcher = Implementation(**settings)

    def setup(self, **kwargs: Any) -> None:
        self.launcher.setup(**kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        return self.launcher.launch(job_overrides, initial_job_idx)
