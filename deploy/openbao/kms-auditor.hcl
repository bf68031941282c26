# kms-auditor: an auditor's token for `kms audit check-anchors`: read and list the anchored audit checkpoints,
# nothing else (no create, update, delete or destroy). Matches audit.anchor {mount: kv, prefix: kms/audit}
# (docs/deployment.md, "Audit anchor").
path "kv/data/kms/audit/checkpoints/*" {
  capabilities = ["read"]
}
path "kv/metadata/kms/audit/checkpoints" {
  capabilities = ["list"]
}
path "kv/metadata/kms/audit/checkpoints/*" {
  capabilities = ["list", "read"]
}
