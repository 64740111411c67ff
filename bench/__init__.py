"""ringlib.bench: benchmarks that measure ringlib beside what it replaces, in one run.

    ringlib bench kernels                          (python -m ringlib.bench.kernels)
    ringlib bench allreduce|reduce_scatter|all_gather|broadcast|latency
                                                   (python -m ringlib.bench.sweep)
    ringlib bench trainer                          (python -m ringlib.bench.trainer)
    ringlib bench pipeline                         (python -m ringlib.bench.pipeline)
    ringlib bench soak                             (python -m ringlib.bench.soak; make soak)
    ringlib bench netem                            (python -m ringlib.bench.netem; make faults)
    python -m ringlib.bench.loopback               the floor plain sockets set here
"""
