"""The model as layerlie takes it (docs/design.md §1): loading by name or checkpoint, the
embedded photos, the model contract, and the torch.fx trace."""
