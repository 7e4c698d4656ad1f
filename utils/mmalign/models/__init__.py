"""Encoders, projection heads, pooling and fusion modules."""
