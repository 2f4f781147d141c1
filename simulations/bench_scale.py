"""Scale benchmark: simulation overhead at K = 10, 100, 500 clients against the
stock Flower pattern. The same as ``fedlora bench-scale`` (fedlora/commands/bench_scale.py)::

    python simulations/bench_scale.py --set dataset=../shared/data/ag_news
"""

import sys

from fedlora.commands.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-scale", *sys.argv[1:]]))
