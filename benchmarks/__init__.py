"""The benchmark harness: ``python -m benchmarks {list,run,report}``.

Tasks register in :data:`benchmarks.registry.TASKS`; the data layer is :mod:`benchmarks.data`,
the reference backbones :mod:`benchmarks.backbones`.
"""
