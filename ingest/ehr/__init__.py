"""EHR extracts: the per-model variable schema (units, conversions, ranges) and row checks."""
