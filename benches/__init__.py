"""sandboxd's benchmarks: each scenario measured beside its baseline in the same run (``python -m benches``)."""
