import os
import sys

# Tests import the helpers module by name; the rwkv oracle needs its v7 switch before import.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "0")
