"""Data loader of rwkvtune's own lm-eval tasks (``custom_dataset`` in their YAML files).

lm-eval resolves a ``data_files`` path against the working directory, so a task shipped inside a
package cannot name its file that way; this loader reads the jsonl beside this file instead, with
the json module (no code runs from the data), and checks every line is a JSON object.
"""

import json
from pathlib import Path


def load_jsonl(data_file: str, **_metadata):
    import datasets

    path = Path(__file__).resolve().parent / data_file
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, found {type(row).__name__}")
                rows.append(row)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
