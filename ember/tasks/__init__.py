"""Tasks: synthetic generators (recall, extraction, SQL, shared-prefix workloads), benchmark loaders, scoring."""
