"""Evaluation: acceptance (tau) of trained adapters, and serving benchmarks. Installed as `flexdraft_sgl.eval`."""
