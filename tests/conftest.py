"""Shared by every Python suite: makes tests/ importable (moat_bin)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
