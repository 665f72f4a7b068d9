"""Lets a command module of src/ run as a file (`python src/convert_checkpoint.py`) as well as a module.

Run as a file, Python puts src/ itself first on sys.path, so `import src.config` fails; such a module
imports this one first (it is found there) and the repository root takes src/'s place on the path.
"""
import os
import sys

_SRC = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _SRC:
    sys.path[0] = os.path.dirname(_SRC)
