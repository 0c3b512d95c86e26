"""Preference data: readers and row validation, mixtures, ChatML formatting, token lengths and the length filter.

The public names are re-exported lazily by :mod:`dpo_xpu`; this package imports nothing itself."""
