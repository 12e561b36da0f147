"""`medflow bench`: node throughput of the stages, and a check against a site's references."""
