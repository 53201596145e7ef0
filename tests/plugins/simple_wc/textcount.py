"""A plain function, packaged the way pyclowder's simple extractors are (see the Dockerfile).

Like many such functions it shells out and returns what the tool printed, as bytes.
"""
import os
import subprocess


def count_text(path):
    """Lines, words and bytes of a text file, from `wc`; plus what the Dockerfile's ENV set."""
    lines, words, chars = subprocess.check_output(["wc", "-l", "-w", "-c", path]).split()[:3]
    return {
        "metadata": {
            "lines": lines,
            "words": words,
            "characters": chars,
            "greeting": os.environ.get("SIMPLE_GREETING"),
            "label": os.environ.get("SIMPLE_LABEL"),
            "broker_from_dockerfile": os.environ.get("RABBITMQ_URI") == "amqp://dockerfile:pw@nowhere/",
            "uid_map": " ".join(open("/proc/self/uid_map").read().split()),
        },
        "tags": ["counted"],
    }
