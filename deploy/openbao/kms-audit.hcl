# kms-audit: the audit signer (kms worker --audit). Reads the audit token's PIN (kv/kms/audit#pin) and anything else
# kept under kv/kms/audit/ (e.g. kv/kms/audit/database#url). Writing checkpoints to the external anchor is another
# policy (kms-audit-anchor.hcl), bound to the same role when the anchor is used.
path "kv/data/kms/audit" {
  capabilities = ["read"]
}

path "kv/data/kms/audit/*" {
  capabilities = ["read"]
}
