"""supportbot training: data loading, strategies (head, lora, full), calibration, evaluation."""
