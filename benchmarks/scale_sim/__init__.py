"""A discrete-event model (SimPy) of the agent at scale: N nodes x R ranks, one RabbitMQ, one Clowder.

Modules: calibration (every measured constant, with where it came from), workload (the stated
distributions of queue waits and file durations), model (the simulation), report (sweeps,
tables, plots), measure (the real runs on this machine that calibrate and validate it).
The command line is benchmarks/scale_model.py.
"""
