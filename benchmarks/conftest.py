import os
import sys

# tests/dist_utils.py (spawned gloo ranks) and benchmarks/_ratio.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
sys.path.insert(0, os.path.dirname(__file__))
