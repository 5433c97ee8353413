"""An example vae_lightning plugin: its parts are registered by this package's entry points."""
