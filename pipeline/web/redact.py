"""Error messages without the server's folders: a file keeps its name, a folder its last part."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

# Any absolute path: the folders before its last component.
_ABS_DIRS = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"]+/)+(?=[^\s/'\"])")


class Redactor:
    """Takes the given folders (and any other absolute path's folders) out of a message."""

    def __init__(self, folders: Iterable[str | Path]):
        forms = set()
        for f in folders:
            for p in (str(f), os.path.abspath(f), os.path.realpath(f)):
                if os.path.isabs(p) and p.rstrip(os.sep):
                    forms.add(p.rstrip(os.sep))
        # Longest first, so a folder inside another is not cut in half.
        self._forms = [
            (re.compile(re.escape(f) + r"(/|(?=[\s'\":;,)]|$))"), os.path.basename(f))
            for f in sorted(forms, key=len, reverse=True)
        ]

    def __call__(self, message: str) -> str:
        for form, name in self._forms:
            message = form.sub(lambda m, name=name: "" if m.group(1) else name, message)
        message = _ABS_DIRS.sub("", message)  # any other absolute path: its file name only
        return " ".join(message.split()) or "error"
