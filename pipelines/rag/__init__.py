"""Retrieval-augmented question answering over the support knowledge base."""
