"""InferenceService: `observe.py` (reads) -> `decide.py` (pure) -> rendering (pure), plugged into
the operator's one loop by `component.py`."""
