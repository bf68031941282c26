"""The revisions, in order: ``0001_baseline`` (the schema of kms before migrations), then one module per change."""
