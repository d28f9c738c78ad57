"""Build hook for the optional C++/CUDA extension.

All metadata lives in pyproject.toml. There is no extension yet, so this installs pure Python; it stays the
place where ``csrc/`` will be compiled, and a pure-Python install must always keep working.
"""

from setuptools import setup

setup()
