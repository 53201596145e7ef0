"""Development tools: not part of the installed product (setup.py does not package this folder).

Run from the repository root (or with it on ``sys.path``): the demo, the benchmarks and the tests
import from here. Nothing under ``agent/`` or ``launcher/`` may import this package.
"""
