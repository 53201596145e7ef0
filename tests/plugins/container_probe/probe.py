#!/usr/bin/env python
"""Test extractor that reports the world it runs in, for the container tests.

Uploads metadata {python, python_version, os, pyclowder, cwd, words, image_marker, input (the path it
read), env: {PROBE_*: value}}:
values that differ between the host and an image (sys.executable, a file only the test image has) and the
variables it was given. The file's first line may say `crash` (os._exit(9)) or `sleep N`.
Also copied into the test image's /extractor by scripts/build_test_image.sh (an image-only plugin).
"""
import os
import sys
import time

from pyclowder.extractors import Extractor
import pyclowder
import pyclowder.files


def _os_name():
    with open("/etc/os-release") as fh:
        fields = dict(line.rstrip("\n").split("=", 1) for line in fh if "=" in line)
    return fields.get("PRETTY_NAME", "").strip('"')


def _image_marker():
    try:
        with open("/etc/clowder-hpc-agent-test-image") as fh:  # only the test image has it
            return fh.read().strip()
    except OSError:
        return ""


def _pyclowder_version():
    try:
        from importlib import metadata
        return metadata.version("pyclowder")
    except Exception:  # Python 3.7 images: no importlib.metadata
        return getattr(pyclowder, "__version__", "")


class Probe(Extractor):
    def __init__(self):
        Extractor.__init__(self)
        self.setup()

    def process_message(self, connector, host, secret_key, resource, parameters):
        with open(resource["local_paths"][0], "rb") as fh:
            text = fh.read().decode("utf-8", "replace")
        words = text.split("\n", 1)[0].split()
        if words[:1] == ["crash"]:
            os._exit(9)
        if words[:1] == ["sleep"]:
            time.sleep(float(words[1]))
        content = {"python": sys.executable, "python_version": "%d.%d" % sys.version_info[:2], "os": _os_name(),
                   "pyclowder": _pyclowder_version(), "cwd": os.getcwd(), "words": len(text.split()),
                   "image_marker": _image_marker(), "input": resource["local_paths"][0],
                   "env": {k: v for k, v in os.environ.items() if k.startswith("PROBE_")}}
        metadata = self.get_metadata(content, "file", resource["id"], host)
        pyclowder.files.upload_metadata(connector, host, secret_key, resource["id"], metadata)


if __name__ == "__main__":
    Probe().start()
