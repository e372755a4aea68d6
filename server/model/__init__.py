"""The domain: task values, the state machine and the error tree. Pure, no I/O."""
