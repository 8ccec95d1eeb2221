"""`medhub evaluate`: the benchmarking study's transfer protocol as a declarative study (repeated runs per
backbone, task, protocol and label fraction; statistics against a baseline; a report with figures)."""
