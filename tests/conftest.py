"""Test-session set-up shared by every test directory.

The tests live in folders that mirror the package (``tests/io``, ``tests/data``...); this file
puts ``tests/`` on ``sys.path`` so each of them imports the shared helpers as ``helpers.*`` and
the subprocess scripts' folders by name. Test file names are unique across folders (pytest's
default import mode needs that).
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
