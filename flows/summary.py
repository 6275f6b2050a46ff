"""Where to look after a flow: the MLflow UI address, the flow's parent run id, the final model's URI and
its registered version.

    python -m flows.summary [--config FILE ...] [key.sub=value ...]    # same arguments as flows/eqface.py
"""

from __future__ import annotations

import sys

from flows.eqface import parse_args
from flows.tracking import TAG_FINAL_MODEL, TAG_REGISTERED_MODEL, FlowTracker


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    tracker = FlowTracker(cfg)
    uri = tracker.uri
    run = tracker.find_flow()
    if run is None:
        print(f"no flow named '{cfg.flow.name}' in experiment '{cfg.tracking.experiment}' at {uri}", file=sys.stderr)
        return 1
    print(f"MLflow UI:       {uri}/#/experiments/{tracker.experiment_id}/runs/{run.info.run_id}")
    print(f"parent run id:   {run.info.run_id}  ({run.info.status})")
    print(f"final model URI: {run.data.tags.get(TAG_FINAL_MODEL, '(not logged yet)')}")
    print(f"registered as:   {run.data.tags.get(TAG_REGISTERED_MODEL, '(not registered yet)')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
