"""Indexer: repository files -> tree-sitter chunks -> memory (keys, values) cached in SQLite."""
