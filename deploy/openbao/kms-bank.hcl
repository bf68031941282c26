# kms-bank: the bank domain's worker service (kms worker --domain bank). Reads its own secrets only: the bank
# token PIN (kv/kms/bank#pin) and anything else kept under kv/kms/bank/ (e.g. kv/kms/bank/database#url).
path "kv/data/kms/bank" {
  capabilities = ["read"]
}

path "kv/data/kms/bank/*" {
  capabilities = ["read"]
}
