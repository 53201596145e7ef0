"""Test helpers (imported as ``helpers.<module>``; tests/ is on sys.path through tests/conftest.py).

- services: checks that the local services answer; fail under CI=true, skip elsewhere
- agent_harness: a real agent process against a real queue and a Clowder stand-in
- chaos_scenarios: the fault scenarios of tests/chaos and benchmarks/reliability_report.py
- datafiles: captured scheduler output under tests/data/
"""
