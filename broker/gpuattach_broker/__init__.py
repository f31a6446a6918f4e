"""Broker, agent and worker of jupyter-gpuattach.

This package imports nothing from Jupyter so that broker and GPU hosts can
install it without a notebook stack.
"""

__version__ = "0.1.0"
