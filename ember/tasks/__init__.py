"""Tasks: synthetic generators (recall, extraction, shared-prefix workloads), benchmark loaders, scoring."""
