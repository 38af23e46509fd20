"""Ray job entry point: `python jobs/score.py [--config FILE ...] [key=value ...]`.

The same command runs under `ray job submit -- python jobs/score.py ...` (it joins the
job's cluster) and alone on a laptop (it starts an embedded local Ray). Exit status 0
only when the run is committed.
"""

import os
import sys

# Under `ray job submit --working-dir .` the project is the working directory, not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafi.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
