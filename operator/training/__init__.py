"""FineTuneJob and AlignmentJob: `observe.py` (reads) -> `decide.py` (pure) -> `render.py` (pure),
plugged into the operator's one loop by `component.py`."""
