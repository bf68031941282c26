# kms-station-NAME: one bureau station (kms station …), NAME replaced by the station's name when the policy is
# written (deploy/openbao/README.md): its token PIN (kv/kms/station/NAME#pin) and its client TLS key
# (kv/kms/station/NAME/tls#key). One policy and one AppRole per station: a station reads no other station's secrets.
path "kv/data/kms/station/NAME" {
  capabilities = ["read"]
}

path "kv/data/kms/station/NAME/*" {
  capabilities = ["read"]
}
