"""After training: held-out reward accuracy and margins, policy-vs-reference samples, merge and export.

The public names are re-exported lazily by :mod:`dpo_xpu`; this package imports nothing itself."""
