"""Configs found by vae_lightning through the vae_lightning.configs entry point."""
