"""EHR workers: features for the risk models (numpy only)."""
