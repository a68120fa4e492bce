"""WorldLM: federated pre-training of language models across a tree of federations."""

__version__ = "0.1.0"
