#!/usr/bin/env python
"""A pyclowder SimpleExtractor that sleeps per file: the workload of the speed benchmarks.

SLEEP_SECONDS sets the time per file (default 0.5); BURN=1 spins the CPU instead of sleeping.
"""
import os
import time

from pyclowder.extractors import SimpleExtractor


class Sleepy(SimpleExtractor):
    def process_file(self, input_file):
        seconds = float(os.getenv("SLEEP_SECONDS", "0.5"))
        started = time.time()
        if os.getenv("BURN") == "1":
            while time.time() - started < seconds:
                sum(i * i for i in range(1000))
        else:
            time.sleep(seconds)
        return {"metadata": {"slept": round(time.time() - started, 3), "size": os.path.getsize(input_file)}}


if __name__ == "__main__":
    Sleepy().start()
