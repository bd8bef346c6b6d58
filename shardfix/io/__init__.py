"""Byte-level helpers every stage shares: positional reads, zip directories, safetensors headers,
allowlist unpickling, digests and byte formatting. Imports nothing from shardfix but ``errors``
and ``dtypes``.
"""
