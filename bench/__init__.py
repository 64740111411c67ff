"""ringlib.bench: benchmarks that measure ringlib beside what it replaces, in one run.

    python -m ringlib.bench.kernels     (also: ringlib bench kernels)
    python -m ringlib.bench.allreduce   (also: ringlib bench allreduce)
    python -m ringlib.bench.trainer     (also: ringlib bench trainer)
"""
