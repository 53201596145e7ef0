"""The in-flight journal's files, as the agent writes them and the launcher counts them.

One folder per agent (locked for its life) under the journal root; each secured message is one
`<ns>-<seq>.msg.json` file holding its body, properties and queue.
"""
from __future__ import annotations

SUFFIX = ".msg.json"
