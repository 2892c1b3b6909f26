"""Results at scale (docs/design.md §1): sweeps over models on Ray, and the parquet store."""
