"""A function for dataset messages: it gets the list of the dataset's downloaded files."""
import os
import tempfile


def summarize(paths):
    texts = sorted(os.path.basename(p) for p in paths if p.endswith(".txt"))
    fd, summary = tempfile.mkstemp(suffix="-summary.csv")
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(texts) + "\n")
    return {
        "metadata": {"text_files": len(texts), "names": texts},
        "tags": ["summarized"],
        "outputs": [summary],
    }
