"""Equivariance measured from inside a training loop (docs/method.md §2, 4, 7): the
framework-free :class:`layerlie.Monitor` (:mod:`layerlie.integrations.monitor`), and one module
per training framework.

Each framework's integration is a module of its own, imported by name, so that one framework's optional
dependency is not needed by another's: :mod:`layerlie.integrations.lightning` (``pip install
layerlie[lightning]``). A TensorBoard writer needs no integration: see
:meth:`layerlie.Monitor.log_to`.
"""
