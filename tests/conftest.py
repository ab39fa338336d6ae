import os
import sys

# Make tests/dist_utils.py importable from spawned children and from benchmarks/.
sys.path.insert(0, os.path.dirname(__file__))
