"""Trainer callbacks: metrics and live curves, checkpoint markers and resume, signals, the step-0 check.

The public names are re-exported lazily by :mod:`dpo_xpu`; this package imports nothing itself."""
