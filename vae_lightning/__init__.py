"""A variational autoencoder on MNIST with PyTorch Lightning and Hydra."""

import vae_lightning.launch  # noqa: F401  (registers the ${tensorboard:...} config resolver)
from vae_lightning.workarounds import silence_lightning_tips, silence_unactionable_warnings

silence_unactionable_warnings()
silence_lightning_tips()
