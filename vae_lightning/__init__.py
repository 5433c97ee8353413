"""A variational autoencoder on MNIST with PyTorch Lightning and Hydra."""
