"""The HSM port: the only package in kms that imports pkcs11 (session verbs, key templates, error translation,
plain value types that import nothing from pkcs11, the SoftHSM2 tooling)."""
