"""Job records → per-site summaries → reports comparing sites (Markdown, HTML, JSON, CSV, figures)."""
