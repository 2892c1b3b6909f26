"""Remedies (docs/design.md §1): anti-aliased substitutes put in by graph surgery, and the
before/after ablation."""
