import gc
import sys

from vitscale.cli import main

code = main()
# The command is done and has closed its files. At exit the interpreter garbage-collects every object still alive,
# and torch's optimizers import torch._dynamo (and sympy with it): hundreds of thousands of objects, 0.9 s of every
# training process's exit on the 2-core test machine. Frozen objects are out of the collector's reach; atexit
# handlers and the release of everything else still run.
gc.freeze()
sys.exit(code)
