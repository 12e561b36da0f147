"""Shards → patient-level nested cross-validation folds → data-parallel trained models (Horovod or DDP)."""
