"""Stage two: MEAL V2 losses, student creation, the training loop and evaluation."""
