"""What a run leaves: the run folder (lock, start, fingerprints), metrics and reward-curve plots, model cards.

The public names are re-exported lazily by :mod:`dpo_xpu`; this package imports nothing itself."""
