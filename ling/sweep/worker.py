"""One worker process of `ling sweep` with `workers: N` (started by `ling.sweep.command`)."""

import sys

from ling.sweep.study import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
