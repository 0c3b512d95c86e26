"""Models: tokenizer, policy (NF4 + LoRA) and reference; the backends are the only modules that know their stack.

The public names are re-exported lazily by :mod:`dpo_xpu`; this package imports nothing itself."""
