"""ringlib.bench: benchmarks that measure ringlib beside what it replaces, in one run.

Each runs as `ringlib bench NAME` (`ringlib bench -h` lists them, `ringlib bench NAME -h`
a benchmark's own options): kernels, allreduce, reduce_scatter, all_gather, broadcast,
latency (sweep.py), trainer, pipeline, soak (`make soak`), chaos (`make chaos`), netem
(`make faults`), loopback (the floor plain sockets set here), admission (growing a
ring) and observing (what the flight recorder and the timeline cost).
"""
