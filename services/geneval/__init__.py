"""GenEval compositional reward: metadata parsing and the pure rule engine turning detections into a score."""
