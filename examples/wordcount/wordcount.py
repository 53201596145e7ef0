#!/usr/bin/env python
"""A plain pyclowder extractor: count lines, words and characters of a text file.

Written only against pyclowder's public API, the way extractors are usually written, so that
it runs unchanged under pyclowder's own RabbitMQ connector (`python wordcount.py`) and under
the HPC agent (`python -m agent run --plugin ncsa.wordcount.hpc`).
"""
import logging

from pyclowder.extractors import Extractor
import pyclowder.files


class WordCount(Extractor):
    """Count the lines, words and characters in a text file."""

    def __init__(self):
        Extractor.__init__(self)
        self.setup()
        logging.getLogger('pyclowder').setLevel(logging.INFO)
        logging.getLogger('__main__').setLevel(logging.INFO)

    def process_message(self, connector, host, secret_key, resource, parameters):
        logger = logging.getLogger(__name__)
        inputfile = resource["local_paths"][0]
        file_id = resource['id']

        with open(inputfile, 'rb') as handle:
            data = handle.read()
        text = data.decode('utf-8', errors='replace')
        result = {
            'lines': text.count('\n'),
            'words': len(text.split()),
            'characters': len(text),
        }
        logger.debug("counted %s", result)

        metadata = self.get_metadata(result, 'file', file_id, host)
        pyclowder.files.upload_metadata(connector, host, secret_key, file_id, metadata)


if __name__ == "__main__":
    extractor = WordCount()
    extractor.start()
