"""The `medhub` command line."""
