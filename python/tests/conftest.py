import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "python"))


def build_dir() -> str:
    return os.environ.get("DRDIFF_BUILD_DIR", os.path.join(ROOT, "build"))
