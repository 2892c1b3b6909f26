"""What a reader sees (docs/design.md §1): the paper's figures and the HTML report."""
