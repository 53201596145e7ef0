#!/usr/bin/env python
"""A class extractor whose requirements.txt pins packages the agent's own venv does not have."""
import logging
import os
import sys

import humanize
import requests

from pyclowder.extractors import Extractor
import pyclowder.files


class Versions(Extractor):
    """Record which interpreter and package versions this extractor runs with."""

    def __init__(self):
        Extractor.__init__(self)
        self.setup()
        logging.getLogger('pyclowder').setLevel(logging.INFO)

    def process_message(self, connector, host, secret_key, resource, parameters):
        size = humanize.naturalsize(len(open(resource["local_paths"][0], "rb").read()))
        content = {"requests": requests.__version__, "humanize": humanize.__version__,
                   "prefix": sys.prefix, "size": size, "wrapped": os.environ.get("TEST_WRAPPED"),
                   "agent_settings_seen": sorted(k for k in os.environ if k.startswith("AGENT_"))}
        metadata = self.get_metadata(content, 'file', resource['id'], host)
        pyclowder.files.upload_metadata(connector, host, secret_key, resource['id'], metadata)


if __name__ == "__main__":
    Versions().start()
