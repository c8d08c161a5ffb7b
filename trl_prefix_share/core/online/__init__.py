"""Online RL (GRPO, RLOO): left-padded prompt + completion rows as documents (`rows`), and the position rule and probe
that decide whether a model can score them packed (`support`)."""
