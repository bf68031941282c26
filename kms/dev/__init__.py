"""Development only, not production: the development home (`kms init`), its PKI and its ceremonies."""
