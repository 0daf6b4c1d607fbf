"""Schema inspection: one JSON document of the same shape for every driver."""
