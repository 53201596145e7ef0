#!/usr/bin/env python3
"""A preview extractor in the shape of Clowder's production ones (written for these tests).

Like extractors-core's image, pdf, audio and video previews, it does nothing until the site
configures it: IMAGE_BINARY, IMAGE_TYPE and the two command lines come from the environment,
with @BINARY@, @INPUT@ and @OUTPUT@ standing for the program, the downloaded file and the file
to upload. Its Dockerfile leaves them empty. Unconfigured, it reports DONE and uploads nothing:
the failure the agent must not cause by letting Dockerfile defaults win over the site's values.
"""
import logging
import os
import subprocess
import tempfile

import pyclowder.files
from pyclowder.extractors import Extractor


def _argv(template, binary, source, target):
    """The command line of one template, each placeholder replaced (no shell runs)."""
    words = []
    for word in template.split():
        word = word.replace("@BINARY@", binary).replace("@INPUT@", source).replace("@OUTPUT@", target)
        words.append(word)
    return words


class CommandPreviews(Extractor):
    def __init__(self):
        Extractor.__init__(self)
        self.setup()
        logging.getLogger("pyclowder").setLevel(logging.INFO)

    def process_message(self, connector, host, secret_key, resource, parameters):
        binary = os.getenv("IMAGE_BINARY", "")
        kind = os.getenv("IMAGE_TYPE", "") or "png"
        jobs = (("thumbnail", os.getenv("IMAGE_THUMBNAIL_COMMAND", "")),
                ("preview", os.getenv("IMAGE_PREVIEW_COMMAND", "")))
        for what, template in jobs:
            if not binary or not template:
                continue
            handle, target = tempfile.mkstemp(suffix="." + kind)
            os.close(handle)
            try:
                subprocess.check_output(_argv(template, binary, resource["local_paths"][0], target),
                                        stderr=subprocess.STDOUT)
                if what == "thumbnail":
                    pyclowder.files.upload_thumbnail(connector, host, secret_key, resource["id"], target)
                else:
                    pyclowder.files.upload_preview(connector, host, secret_key, resource["id"], target, None)
                connector.message_process(resource, "made the %s as %s" % (what, kind))
            finally:
                os.remove(target)


if __name__ == "__main__":
    CommandPreviews().start()
