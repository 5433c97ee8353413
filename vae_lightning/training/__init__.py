"""The LightningModule and what runs inside fit and test: callbacks, the test pass's evaluation,
stop signals, progress lines."""
