"""A variational autoencoder on MNIST with PyTorch Lightning and Hydra."""

import os

# torch's OpenMP threads sleep, not spin, while they wait for each other (unless the user chose):
# runs side by side on the same cores spun against each other, 4x slower than one after the other
# (docs/performance.md). Read when OpenMP starts, so before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import vae_lightning.launch  # noqa: F401  (registers the ${tensorboard:...} config resolver)
from vae_lightning.workarounds import (
    config_errors_in_one_line,
    silence_lightning_tips,
    silence_unactionable_warnings,
)

silence_unactionable_warnings()
silence_lightning_tips()
config_errors_in_one_line()
