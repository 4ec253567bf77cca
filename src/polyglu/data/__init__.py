"""Data: tokenizers, token shards, loaders, chat formatting, the built-in math corpus.

Knows nothing of the model.
"""
