"""metaembed: Meta Tokens and Matryoshka Multi-Vector Retrieval (Xiao et al., 2025)."""
__version__ = "0.1.0"
