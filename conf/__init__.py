"""The configs, shipped inside the package as ``vae_lightning.conf`` (pyproject.toml maps this folder)."""
