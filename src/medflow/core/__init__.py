"""What every stage shares: config, seeds, errors, atomic files, job records, provenance, manifests,
the shard and cohort-index formats, metrics. Imports nothing else of medflow."""
