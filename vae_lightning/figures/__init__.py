"""Figure builders and the report page."""
