"""The tamper-evident audit log, its signer process, the offline verifier and the anomaly alarms it records."""
