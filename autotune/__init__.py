"""dskc.autotune: Optuna autotuning per GPU architecture."""
