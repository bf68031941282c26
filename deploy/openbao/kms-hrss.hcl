# kms-hrss: the HRSS domain's worker service (kms worker --domain hrss). Reads its own secrets only: the HRSS
# token PIN (kv/kms/hrss#pin) and anything else kept under kv/kms/hrss/ (e.g. its database URL,
# kv/kms/hrss/database#url). KV version 2 on mount kv/: data is read at kv/data/<path>. Nothing else is granted,
# and OpenBao denies by default.
path "kv/data/kms/hrss" {
  capabilities = ["read"]
}

path "kv/data/kms/hrss/*" {
  capabilities = ["read"]
}
