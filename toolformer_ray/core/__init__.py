"""The Toolformer method itself, free of Ray: sampling, filtering and merging as pure functions on
batches."""
