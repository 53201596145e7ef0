#!/usr/bin/env python
"""Test extractor whose input file says what it should do, one directive on the first line:

  ok                 upload metadata {directive, pid, bytes}
  sleep SECONDS      sleep, then as ok
  raise              raise RuntimeError (retryable failure)
  raise-once PATH    raise the first time (creates PATH), succeed after
  exit               sys.exit(3) inside process_message
  crash              os._exit(9): the process dies
  segv               SIGSEGV to itself
  abort              PyClowderExtractionAbort (permanent failure)
  print              print() to stdout (must not corrupt anything), then as ok
  tags               upload tags and metadata
  outputs            upload tags, a preview and a new file to the file's dataset, then as ok
  leak MB            hold MB megabytes, then sleep 30 s (a memory hog)
A file whose name ends in ".bypass" is not downloaded at all (check_message says bypass) and
gets metadata {directive: "bypass"}.
Every run appends "<file id> <pid>" to $DIRECTIVE_LOG when that is set, so tests count runs.
"""
import os
import signal
import sys
import time

from pyclowder.connectors import PyClowderExtractionAbort
from pyclowder.utils import CheckMessage
from pyclowder.extractors import Extractor
import pyclowder.files


class Directive(Extractor):
    def __init__(self):
        Extractor.__init__(self)
        self.setup()

    def check_message(self, connector, host, secret_key, resource, parameters):
        if str(resource.get("name", "")).endswith(".bypass"):
            return CheckMessage.bypass
        return CheckMessage.download

    def process_message(self, connector, host, secret_key, resource, parameters):
        if not resource.get("local_paths"):  # bypassed: nothing was downloaded
            content = {"directive": "bypass", "pid": os.getpid()}
            metadata = self.get_metadata(content, "file", resource["id"], host)
            pyclowder.files.upload_metadata(connector, host, secret_key, resource["id"], metadata)
            return
        path = resource["local_paths"][0]
        with open(path, "rb") as fh:
            data = fh.read()
        words = data.decode("utf-8", "replace").split("\n", 1)[0].split()
        verb = words[0] if words else "ok"
        log = os.getenv("DIRECTIVE_LOG")
        if log:
            with open(log, "a") as fh:
                fh.write("%s %d %s\n" % (resource["id"], os.getpid(), verb))
        if verb == "sleep":
            time.sleep(float(words[1]))
        elif verb == "raise":
            raise RuntimeError("directive says raise")
        elif verb == "raise-once":
            if not os.path.exists(words[1]):
                open(words[1], "w").close()
                raise RuntimeError("directive says raise once")
        elif verb == "exit":
            sys.exit(3)
        elif verb == "crash":
            os._exit(9)
        elif verb == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif verb == "abort":
            raise PyClowderExtractionAbort("directive says abort")
        elif verb == "print":
            print("hello from an extractor that prints")
        elif verb == "leak":
            hog = bytearray(int(words[1]) * 1024 * 1024)
            for i in range(0, len(hog), 4096):
                hog[i] = 1  # touch every page so it is resident
            time.sleep(30)
        elif verb == "tags":
            pyclowder.files.upload_tags(connector, host, secret_key, resource["id"], {"tags": ["directive"]})
        elif verb == "outputs":
            pyclowder.files.upload_tags(connector, host, secret_key, resource["id"], {"tags": ["directive"]})
            pyclowder.files.upload_preview(connector, host, secret_key, resource["id"], path)
            made = os.path.join(os.path.dirname(path), "made-by-directive.txt")
            with open(made, "w") as fh:
                fh.write("new file\n")
            pyclowder.files.upload_to_dataset(connector, host, secret_key, resource["parent"]["id"], made)
        content = {"directive": verb, "pid": os.getpid(), "bytes": len(data)}
        metadata = self.get_metadata(content, "file", resource["id"], host)
        pyclowder.files.upload_metadata(connector, host, secret_key, resource["id"], metadata)


if __name__ == "__main__":
    Directive().start()
