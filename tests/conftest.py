import os
import sys

# Tests may import tests/dist_pool.py as a plain module, in the test process and in spawned ranks.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")
