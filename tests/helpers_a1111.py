"""AUTOMATIC1111's reading rule for a PNG's ``parameters`` chunk, written from its documented layout.

Layout: prompt lines, then lines after ``Negative prompt:`` (the negative prompt), then a last line
of ``Key: value`` fields separated by commas (it counts as the fields line when it holds at least 3);
a value that starts and ends with a double quote is a JSON string.
"""
from __future__ import annotations

import json
import re

FIELD = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"


def parse_parameters(text: str) -> dict[str, str]:
    """``{"Prompt", "Negative prompt", <field>: value}`` as A1111's PNG Info reads them."""
    lines = text.strip().split("\n")
    found = FIELD.findall(lines[-1])
    fields = dict(found) if len(found) >= 3 else {}
    prompt, negative, in_negative = [], [], False
    for line in lines[:-1] if fields else lines:
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    values = {k: json.loads(v) if len(v) > 1 and v[0] == v[-1] == '"' else v for k, v in fields.items()}
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **values}
