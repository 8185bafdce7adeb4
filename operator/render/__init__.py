"""InferenceService rendering (moving to `kubetune.operator.serving.render`)."""
