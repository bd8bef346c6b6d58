"""What an output directory looks like: layouts (file names, index files, sidecars), the streaming
safetensors writer, and reading an output back (``restore``).
"""
