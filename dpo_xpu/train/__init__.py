"""The trainer: recipe -> TRL's DPOConfig, the DPOTrainer subclass, dpo_xpu's own losses, prefix sharing and the
precomputed reference.

The public names are re-exported lazily by :mod:`dpo_xpu`; this package imports nothing itself."""
