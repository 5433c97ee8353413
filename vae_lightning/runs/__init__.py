"""A run's life: building it from the config, its dir, continuing it, its checkpoints, its
results, sweeps, processes."""
