# kms-front: the front end (kms serve with worker services). Reads the database URL (or password) and the server's
# TLS private key, nothing else: no PIN of any domain, nor the audit signer's.
path "kv/data/kms/front/database" {
  capabilities = ["read"]
}

path "kv/data/kms/front/tls" {
  capabilities = ["read"]
}
