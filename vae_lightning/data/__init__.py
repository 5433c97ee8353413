"""Finding, checking and reading the datasets; the DataModule, binarizing, batches."""
