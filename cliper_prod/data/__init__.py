"""Data stage: MMRec-format loading and validation, BPR sampling, the synthetic catalog."""
