"""Experiments that train models on this machine and measure their equivariance along the way.

``learned``: small timm models trained on data bundled with scikit-learn and scikit-image,
measured at initialisation, along training and at the end (docs/method.md §2, 4, 7); ``learned_report``
draws its figures and writes its summary from the results store.
"""
