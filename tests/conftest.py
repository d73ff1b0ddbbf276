import os
import sys

# Make tests/contract.py importable as `contract` from every test module.
sys.path.insert(0, os.path.dirname(__file__))
