"""The fault suite (issue 8, point 10): SIGKILLs during a large replay, a
database outage, a broker restart and a flood of malformed messages, each
checked for every published event stored exactly once, rollups equal to
aggregates recomputed from the raw tables, and alerts stored once and keyed."""
