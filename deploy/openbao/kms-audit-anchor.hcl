# kms-audit-anchor: the audit signer's AppRole (kms worker --audit, or the signer process of kms serve).
# It may only CREATE anchors of signed audit checkpoints: a path that already holds one is refused (a write there
# would be an update), so no anchor can be overwritten, deleted or destroyed by this role; kms also writes with
# cas=0. No read, no list: the signer never needs to see the history it anchors. Matches audit.anchor
# {mount: kv, prefix: kms/audit}; change the paths with them (docs/deployment.md, "Audit anchor").
path "kv/data/kms/audit/checkpoints/*" {
  capabilities = ["create"]
}
