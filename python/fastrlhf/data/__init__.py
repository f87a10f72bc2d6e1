"""Data: tokenizers, corpora, JSONL formats, collators."""
