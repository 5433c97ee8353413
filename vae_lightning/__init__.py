"""A variational autoencoder on MNIST with PyTorch Lightning and Hydra."""

import warnings

# Lightning 2.6 builds torch's LeafSpec, which torch 2.14 deprecates: a warning on every run that
# no user can act on (Lightning's to fix)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
