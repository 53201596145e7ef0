#!/usr/bin/env python
"""An extractor that does nothing, for measuring what running an extractor costs (no-op overhead).

check_message answers CheckMessage.bypass, so pyclowder neither fetches the file info nor
downloads the file; process_message returns at once. pyclowder still sends its STARTED and
DONE statuses, and the message is acknowledged as for any extractor.
"""
from pyclowder.extractors import Extractor
from pyclowder.utils import CheckMessage


class Noop(Extractor):
    """Bypass the download, do nothing."""

    def __init__(self):
        Extractor.__init__(self)
        self.setup()

    def check_message(self, connector, host, secret_key, resource, parameters):
        return CheckMessage.bypass

    def process_message(self, connector, host, secret_key, resource, parameters):
        pass


if __name__ == "__main__":
    Noop().start()
