"""A variational autoencoder on MNIST with PyTorch Lightning and Hydra."""

import warnings

import vae_lightning.launch  # noqa: F401  (registers the ${tensorboard:...} config resolver)

# Lightning builds torch's LeafSpec, which torch deprecates: a warning on every run that
# no user can act on (Lightning's to fix)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# the data are tensors on the training device, indexed once per batch: worker processes would
# only copy them (Lightning suggests workers for every DataLoader)
warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
