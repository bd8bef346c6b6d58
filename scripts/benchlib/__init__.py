"""Pieces of ``scripts/bench``: measurement (``measure``), one generator and one baseline per source
format (``gen_*``, ``baselines``), the registry tying them together (``formats``) and the output
comparison (``compare``). ``scripts/bench.py`` is the driver."""
