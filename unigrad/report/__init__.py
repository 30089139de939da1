"""The run report: plots and an HTML page from a run directory."""
