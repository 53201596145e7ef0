#!/usr/bin/env python3
"""Test extractor written in the shape of Clowder's production class extractors, on the agent's
own pyclowder: the header row of a CSV file as metadata.

A file that is not UTF-8 text raises UnicodeDecodeError on every attempt (pyclowder retries it
MAX_RETRY times, then error.<queue>).
"""
import csv
import logging

from pyclowder.extractors import Extractor
import pyclowder.files


class CsvColumns(Extractor):
    """Metadata: the column names from the first row."""

    def __init__(self):
        Extractor.__init__(self)
        self.setup()
        logging.getLogger('pyclowder').setLevel(logging.INFO)

    def process_message(self, connector, host, secret_key, resource, parameters):
        with open(resource['local_paths'][0], newline='', encoding='utf-8') as fh:
            columns = next(csv.reader(fh), [])
        metadata = self.get_metadata({"columns": columns}, 'file', resource['id'], host)
        pyclowder.files.upload_metadata(connector, host, secret_key, resource['id'], metadata)


if __name__ == "__main__":
    CsvColumns().start()
