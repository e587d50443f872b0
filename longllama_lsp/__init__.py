"""Repository-aware completions and Q&A on LongLLaMA (Focused Transformer) memory."""

__version__ = "0.1.0"
