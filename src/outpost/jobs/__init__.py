"""Job kinds and the executor: limits, timeouts, cancel, at-most-once by job id."""
