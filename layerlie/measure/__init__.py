"""The measurements (docs/design.md §1): the end-to-end Lie derivative and LEE, the per-node
attribution, aliasing, the finite metrics and the training monitor."""
