"""The agent: runs unchanged pyclowder extractors inside HPC allocations."""
