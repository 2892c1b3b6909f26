"""Training frameworks: equivariance measured from inside their loops (docs/method.md §2, 4, 7).

Each integration is a module of its own, imported by name, so that one framework's optional
dependency is not needed by another's: :mod:`layerlie.integrations.lightning` (``pip install
layerlie[lightning]``). A TensorBoard writer needs no integration: see
:meth:`layerlie.Monitor.log_to`.
"""
