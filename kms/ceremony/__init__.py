"""Key ceremonies under dual control: rules (no state), the store, operations, HSM-side key operations,
components, officers, transport key hand-offs."""
