"""What a card is and gets: identity, derivation recipes, the software reference, profiles, the HSM self-test."""
