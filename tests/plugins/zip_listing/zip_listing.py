#!/usr/bin/env python
"""Test extractor written in the shape of Clowder's production class extractors (Extractor subclass,
setup() in __init__, pyclowder.files.upload_metadata), pinned to an old pyclowder in requirements.txt.

A file that is not a zip archive raises zipfile.BadZipFile on every attempt: pyclowder retries it
MAX_RETRY times, then sends the message to error.<queue>.
"""
import logging
import zipfile

from pyclowder.extractors import Extractor
import pyclowder.files


class ZipListing(Extractor):
    """Metadata: the archive's member names and how many there are."""

    def __init__(self):
        Extractor.__init__(self)
        self.setup()
        logging.getLogger('pyclowder').setLevel(logging.INFO)

    def process_message(self, connector, host, secret_key, resource, parameters):
        with zipfile.ZipFile(resource['local_paths'][0]) as archive:
            names = archive.namelist()
        content = {"members": names, "count": len(names)}
        metadata = self.get_metadata(content, 'file', resource['id'], host)
        pyclowder.files.upload_metadata(connector, host, secret_key, resource['id'], metadata)


if __name__ == "__main__":
    ZipListing().start()
