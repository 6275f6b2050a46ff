"""Ray Tune search over the margins (m1, m2, m3), the scale S and the margin form, compared in MLflow.

    ray job submit --working-dir . -- python flows/tune_margins.py --space configs/tune_margins.yaml \
        [--config FILE ...] [key.sub=value ...] --name NAME [--out DIR] [--storage URI] [--resume]

Each trial is a small driver function that runs step 1 of the flow (and step 2 where the space says so)
through the flow's own step runner, so what a search finds transfers to the flow. Every epoch reports a
held-out metric to Tune through `TuneReportCallback`; ASHA stops hopeless trials at its rungs. The driver
logs one MLflow parent run per search and one child run per trial, and writes the best configuration as a
YAML override for `flows/eqface.py`. The code is the package flows/margin_search/: space.py (the search
space and its checks), trial.py (one trial), tracking.py (MLflow), search.py (this driver).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root
    # Through the package module: Tune pickles `flows.margin_search.*` by reference, not `__main__`.
    from flows.margin_search.search import main

    sys.exit(main())
