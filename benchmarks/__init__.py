"""The benchmark scripts, each run from the repository root as ``python -m benchmarks.<name>``
(``python -m benchmarks.run_all`` runs the suite); ``_common`` is their shared harness."""
